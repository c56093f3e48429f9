"""Every GPU check and peer comparison of hetrain in one command, each step in a process of its
own under its own time limit, so that one failure or hang loses that step and nothing else.

Steps, in the order they run (the most informative first, so a short lease still yields them;
each under its own limit, and none past the deadline):
1. `tests`: the GPU tests (`pytest -m gpu`);
2. `peers`: hetrain against FSDP2 with CPU offload, DeepSpeed ZeRO-Offload (ZeRO-2 with the
   optimizer on the CPU) and ZeRO-3 with parameters and optimizer on the CPU: same model, batch
   and GPU memory cap (bench/gpu/systems.py), tokens/s and hetrain's ratio to each; then one
   more step of each under torch.profiler (the device's busy share), and hetrain's traces
   (its engine's lanes, and the profiler's) into the output folder;
3. `predictor`: predicted against measured step time and peak memory (bench/bench_predictor.py);
4. `capacity`: the largest model each system trains under a fixed cap, by doubling then
   bisection over the number of blocks at a fixed width;
5. `bound`: the offload engine at a quarter of plain training's memory against its plan's lower
   bound (bench/bench_offload_bound.py), as many sizes as the time left allows.
`mixed`, second: a cluster plan with one CUDA stage and one CPU stage under torchrun (the
host-staged path between kinds for real) against one process on the same global batch.

Modes: `full` (the sizes worth reporting, about 8 minutes on one H200), `quick` (the same steps
at small sizes on the GPU, a smoke test of a couple of minutes) and `dry` (tiny sizes on the CPU;
steps that need a GPU report why they were skipped). Writes `results.json` (everything, with
the machine, torch version and date) and `results.md` (the tables) into --out.

    python bench/gpu/gpu_evidence.py --mode full --out OUT [--deadline-s 470]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from report import markdown, plot_peers, replot  # bench/gpu/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
GIB = 2**30

# Per mode: the sizes of every step. Budgets in seconds are each step's own limit; `capacity`
# takes what is left before the deadline.
MODES: dict[str, dict] = {
    "dry": {
        "tests_s": 120,
        "peers": {"model": {"model.preset": "tiny", "model.n_layer": "4"}, "micro_batch": 4, "seq_len": 32,
                  "cap_gib": None, "steps": 3, "warmup": 1, "limit_s": 150},
        "bound": {"only": ["L8 d256 b8 s128"], "steps": 2, "warmup": 1, "limit_s": 90},
        "predictor": {"only": ["L2-d128-b8-s64"], "steps": 4, "limit_s": 90},
        "mixed": {"preset": "tiny", "seq_len": 32, "global_batch": 8, "micro_batch": 2, "steps": 4,
                  "rel_tol": 1e-5, "limit_s": 120},
        "capacity": {"width": {"model.preset": "tiny"}, "micro_batch": 2, "seq_len": 32, "cap_gib": None,
                     "start_layers": 1, "max_layers": 2, "trial_s": 60, "min_s": 20, "limit_s": 90},
    },
    "quick": {
        "tests_s": 120,
        "peers": {"model": {"model.preset": "gpt2-small"}, "micro_batch": 2, "seq_len": 256, "cap_gib": 3.0,
                  "steps": 1, "warmup": 1, "limit_s": 60},
        "bound": {"only": ["gpt2-medium b8 s1024"], "steps": 1, "warmup": 1, "limit_s": 60},
        "predictor": {"only": ["gpt2-small b8 s1024"], "steps": 3, "limit_s": 60},
        "mixed": {"preset": "tiny", "seq_len": 32, "global_batch": 8, "micro_batch": 2, "steps": 4,
                  "rel_tol": 1e-4, "limit_s": 90},
        "capacity": {"width": {"model.preset": "gpt2-small"}, "micro_batch": 2, "seq_len": 256, "cap_gib": 1.0,
                     "start_layers": 8, "max_layers": 32, "trial_s": 30, "min_s": 20, "limit_s": 60},
    },
    "full": {
        "tests_s": 150,
        "peers": {"model": {"model.preset": "gpt3-1.3b"}, "micro_batch": 8, "seq_len": 1024, "cap_gib": 16.0,
                  "steps": 3, "warmup": 2, "limit_s": 100},
        "bound": {"only": None, "steps": 3, "warmup": 2, "limit_s": 240},
        "predictor": {"only": None, "steps": 8, "limit_s": 120},
        "mixed": {"preset": "small", "seq_len": 128, "global_batch": 8, "micro_batch": 2, "steps": 6,
                  "rel_tol": 1e-4, "limit_s": 120},
        "capacity": {"width": {"model.preset": "gpt3-1.3b"}, "micro_batch": 4, "seq_len": 1024, "cap_gib": 8.0,
                     "start_layers": 12, "max_layers": 96, "trial_s": 60, "min_s": 30, "limit_s": 100},
    },
}
SYSTEM_ORDER = ("hetrain", "zero2-offload", "zero3-offload", "fsdp2-offload")
HOST_PARAM_BYTES = 20  # host bytes per parameter a trial may take (fp32 master, Adam, grads, bf16 copy)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Run:
    """What every step needs: the sizes of the mode, where to work and write, the deadline."""

    cfg: dict
    cuda: bool
    work: Path
    """Scratch folder (parts, profiles, traces); removed at the end."""
    out: Path
    deadline: float
    """perf_counter() time by which the whole run must end; no step's limit reaches past it."""

    @property
    def profile_dir(self) -> str:
        return str(self.work / "profiles")

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()


def run_limited(run: Run, cmd: list[str], limit_s: float) -> dict:
    """Run `cmd` in its own process group, echoing its output; kill the group at `limit_s` or
    at the run's deadline, whichever comes first."""
    limit_s = min(limit_s, run.left_s() - 2)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    for line in (out or "").splitlines():
        lines.append(line)
        print("    " + line, flush=True)
    return {"rc": proc.returncode, "timed_out": timed_out, "seconds": round(time.perf_counter() - start, 1),
            "tail": "\n".join(lines[-25:])}


def machine() -> dict:
    import torch

    info = {"date": datetime.date.today().isoformat(), "time_utc": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%H:%M"), "torch": torch.__version__, "cuda": torch.version.cuda, "python":
            platform.python_version(), "cpu_cores": os.cpu_count(), "host_ram_gib": round(
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        info["cpu"] = ""
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GIB, 1))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = ""
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["commit"] = ""
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as e:  # noqa: BLE001 - any import failure means: not available
        info["deepspeed"] = f"not available ({type(e).__name__})"
    return info


# --- the steps ---------------------------------------------------------------------------


def systems_cmd(run: Run, system: str, model: dict, c: dict, out: Path, *extra: str) -> list[str]:
    """bench/gpu/systems.py for one system at the sizes in `c` (micro_batch, seq_len, cap_gib)."""
    cmd = [PY, str(ROOT / "bench/gpu/systems.py"), "--system", system, "--model", json.dumps(model),
           "--micro-batch", str(c["micro_batch"]), "--seq-len", str(c["seq_len"]), "--profile-dir", run.profile_dir,
           "--json", str(out), *extra]
    if c["cap_gib"] is not None and run.cuda:
        cmd += ["--cap-gib", str(c["cap_gib"])]
    return cmd


def step_tests(run: Run) -> dict:
    res = run_limited(run, [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            "tests/offload/test_engine_cuda.py", "tests/train/test_training_cuda.py"],
                      run.cfg["tests_s"])
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", res["tail"])}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", res["tail"], flags=re.M)
    ok = res["rc"] == 0 and not res["timed_out"]
    status = "ok" if ok and run.cuda else ("skipped" if ok else "failed")
    return {"status": status, "counts": counts, "failed": failed, **res,
            **({} if run.cuda else {"reason": "no CUDA device: the GPU tests skip themselves"})}


def step_peers(run: Run) -> dict:
    """Every system at the same sizes and cap; each one more step under torch.profiler (not
    timed), hetrain's traces kept in the output folder."""
    c = run.cfg["peers"]
    traces = run.work / "traces"
    rows = []
    for system in SYSTEM_ORDER:
        out = run.work / f"peer-{system}.json"
        log(f"peers: {system}")
        res = run_limited(run, systems_cmd(run, system, c["model"], c, out, "--steps", str(c["steps"]), "--warmup",
                                           str(c["warmup"]), "--trace-dir", str(traces)), c["limit_s"])
        row = json.loads(out.read_text()) if out.is_file() else {
            "system": system, "ok": False, "error": "timed out" if res["timed_out"] else f"exit {res['rc']}"}
        row["wall_s"] = res["seconds"]
        rows.append(row)
    for name in ("engine_trace.json", "engine_timeline.png", "hetrain_torch_trace.json.gz"):
        if (traces / name).is_file():
            shutil.copy(traces / name, run.out / name)
    base = next((r for r in rows if r["system"] == "hetrain" and r.get("ok")), None)
    for r in rows:
        if base and r.get("ok") and r["system"] != "hetrain":
            r["hetrain_ratio"] = base["tokens_per_s"] / r["tokens_per_s"]
    broken = [r["system"] for r in rows if not r.get("ok") and not r.get("error", "").startswith("skipped")]
    out = {"status": "failed" if base is None else ("partial" if broken else "ok"), "setting": c, "rows": rows}
    if broken:
        out["error"] = f"did not run: {', '.join(broken)}"
    if not run.cuda:
        out["reason"] = "dry run on the CPU: code paths only, no figure"
    return out


def step_bench(run: Run, script: str, args: list[str], limit_s: float, name: str) -> dict:
    part = run.work / f"{name}.json"
    res = run_limited(run, [PY, str(ROOT / "bench" / script), *args, "--json", str(part)], limit_s)
    rows = json.loads(part.read_text()) if part.is_file() else []
    ok = res["rc"] == 0 and not res["timed_out"] and rows
    out = {"status": "ok" if ok else ("partial" if rows else "failed"), "rows": rows, **res}
    if not run.cuda:
        out["reason"] = "dry run on the CPU: CPU sizes, checked for running only"
    elif res["timed_out"]:
        out["error"] = f"stopped at its limit after {len(rows)} rows"
    return out


def step_bound(run: Run) -> dict:
    c = run.cfg["bound"]
    args = ["--steps", str(c["steps"]), "--warmup", str(c["warmup"])]
    if c["only"]:
        args += ["--only", *c["only"]]
    if run.cuda:
        args += ["--plot", str(run.out / "bound.png")]
    return step_bench(run, "bench_offload_bound.py", args, c["limit_s"], "bound")


def step_predictor(run: Run) -> dict:
    c = run.cfg["predictor"]
    args = ["--steps", str(c["steps"]), "--retries", "0", "--max-wait", "1"]
    if c["only"]:
        args += ["--only", *c["only"]]
    return step_bench(run, "bench_predictor.py", args, c["limit_s"], "predictor")


def capacity_trial(run: Run, system: str, n_layer: int, limit_s: float) -> dict:
    c = run.cfg["capacity"]
    out = run.work / f"cap-{system}-{n_layer}.json"
    cmd = systems_cmd(run, system, {**c["width"], "model.n_layer": str(n_layer)}, c, out, "--steps", "1",
                      "--warmup", "1", "--fast-init", "--host-budget-gib", str(round(0.8 * host_ram_gib(), 1)))
    res = run_limited(run, cmd, limit_s)
    if out.is_file():
        row = json.loads(out.read_text())
        return {"n_layer": n_layer, "ok": row["ok"], "oom": row["oom"], "params": row["params"],
                "error": row["error"][:200], "seconds": res["seconds"]}
    return {"n_layer": n_layer, "ok": False, "oom": False, "params": 0, "seconds": res["seconds"],
            "timed_out": res["timed_out"], "error": "timed out" if res["timed_out"] else f"exit {res['rc']}"}


def host_ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def layer_params(c: dict) -> tuple[int, int]:
    """Parameters of one block and of the rest (embeddings, final norm) at the capacity width."""
    from hetrain.config import load_config
    from hetrain.model.describe import describe_model

    cfg = load_config(None, {**c["width"], "model.n_layer": "2", "train.seq_len": str(c["seq_len"])})
    d = describe_model(cfg.model, c["micro_batch"], c["seq_len"])
    per_block = d.blocks[0].params
    return per_block, d.total_params - 2 * per_block


def search_capacity(run: Run, system: str, until: float) -> dict:
    """Doubling from start_layers until a trial fails, then bisection between the largest
    success and the smallest failure, until they meet or `until` (a perf_counter time). A size
    whose host memory (HOST_PARAM_BYTES per parameter) would pass 80% of RAM is not tried. A
    trial that runs out of time or fails other than by running out of memory says nothing
    about memory: the search stops there, and the largest success is a lower bound."""
    c = run.cfg["capacity"]
    per_block, rest = layer_params(c)
    max_by_host = int((0.8 * host_ram_gib() * GIB / HOST_PARAM_BYTES - rest) // per_block)
    top = min(c["max_layers"], max_by_host)
    trials: list[dict] = []
    good, bad = 0, None
    n = min(c["start_layers"], top)
    while time.perf_counter() < until - 5:
        trial = capacity_trial(run, system, n, min(c["trial_s"], until - time.perf_counter()))
        trials.append(trial)
        log(f"capacity {system}: {n} blocks -> {'ok' if trial['ok'] else trial['error'][:80]}")
        if not trial["ok"] and not trial["oom"]:  # a time-out or an error is no verdict on memory
            break
        if trial["ok"]:
            good = max(good, n)
        else:
            bad = n if bad is None else min(bad, n)
        if bad is None:
            if n >= top:
                break
            n = min(2 * n, top)
        else:
            if bad - good <= 1:
                break
            n = (good + bad) // 2 if good else max(1, bad // 2)
            if n in {t["n_layer"] for t in trials}:
                break
    largest = max((t for t in trials if t["ok"]), key=lambda t: t["n_layer"], default=None)
    return {"system": system, "largest_layers": largest["n_layer"] if largest else 0,
            "largest_params": largest["params"] if largest else 0, "smallest_failed_layers": bad,
            "searched_to": top, "exact": bad is not None and bad - good <= 1,
            "hit_search_top": bad is None and good >= top, "trials": trials, "per_block_params": per_block}


def step_capacity(run: Run) -> dict:
    """Each system searches in an equal share of the step's limit (or of the time left)."""
    rows = []
    until = time.perf_counter() + min(run.cfg["capacity"]["limit_s"], run.left_s())
    for i, system in enumerate(SYSTEM_ORDER):
        share = (until - time.perf_counter()) / (len(SYSTEM_ORDER) - i)
        if share < 10:
            rows.append({"system": system, "skipped": "no time left"})
            continue
        rows.append(search_capacity(run, system, time.perf_counter() + share))
    base = next((r for r in rows if r["system"] == "hetrain" and r.get("largest_params")), None)
    for r in rows:
        if base and r.get("largest_params") and r["system"] != "hetrain":
            r["hetrain_ratio"] = base["largest_params"] / r["largest_params"]
    out = {"status": "ok" if base else "failed", "setting": run.cfg["capacity"], "rows": rows}
    if not run.cuda:
        out["reason"] = "dry run on the CPU: no memory cap to reach; the search's code path only"
    return out


MIXED_CLUSTER = """# written by bench/gpu/gpu_evidence.py: one {first} stage and one CPU stage
name = "gpu-and-cpu"
[[group]]
name = "first"
kind = "{first}"
{label}nodes = 1
devices_per_node = 1
intra_node_gbytes_per_s = 50
inter_node_gbytes_per_s = 25
[[group]]
name = "cpu"
kind = "cpu"
label = "cpu-b"
nodes = 1
devices_per_node = 1
intra_node_gbytes_per_s = 2
inter_node_gbytes_per_s = 2
peak_fp32_tflops = 0.5
"""


def step_mixed(run: Run) -> dict:
    """A cluster plan with one stage on the GPU and one on the CPU (on a CPU-only machine: two
    CPU processes labelled as two kinds), planned with --plan.pp 2, run under torchrun, against
    one process training the same model plainly on the same global batch."""
    c = run.cfg["mixed"]
    work = run.work / "mixed"
    work.mkdir(parents=True, exist_ok=True)
    first = "H200" if run.cuda else "cpu"
    cluster = work / "cluster.toml"
    cluster.write_text(MIXED_CLUSTER.format(first=first, label="" if run.cuda else 'label = "cpu-a"\n'))
    model = ["--model.preset", c["preset"], "--train.seq_len", str(c["seq_len"])]
    common = [*model, "--train.steps", str(c["steps"]), "--train.eval_every", "0", "--train.log_every", "1",
              "--train.ckpt_every", "0", "--log.progress", "false", "--log.tensorboard", "false"]
    # Priced in fp32 (--plan.dtype fp32), as the run computes (the runtime's default), so the
    # predicted step describes this run; its losses compare with one fp32 process to rel_tol.
    plan = run_limited(run, [PY, "-m", "hetrain.cli", "plan", "--cluster", str(cluster), *model, "--plan.dtype",
                             "fp32", "--plan.pp", "2", "--plan.dp", "1", "--plan.global_batch", str(c["global_batch"]),
                             "--plan.micro_batch", str(c["micro_batch"]), "--run.dir", str(work / "plan")], 60)
    if plan["rc"] != 0:
        return {"status": "failed", "error": "hetrain plan failed", **plan}
    env_cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "hetrain.cli",
               "train", "--plan.file", str(work / "plan" / "plan.json"), "--run.dir", str(work / "two"), *common]
    two = run_limited(run, env_cmd, c["limit_s"])
    one = run_limited(run, [PY, "-m", "hetrain.cli", "train", *common, "--memory.device_budget", "none",
                            "--run.device", "cpu", "--train.micro_batch", str(c["micro_batch"]),
                            "--train.grad_accum", str(c["global_batch"] // c["micro_batch"]),
                            "--run.dir", str(work / "one")], c["limit_s"])
    if two["rc"] != 0 or one["rc"] != 0:
        return {"status": "failed", "error": f"torchrun exit {two['rc']}, one process exit {one['rc']}",
                "tail": two["tail"]}
    rows = {}
    for name in ("two", "one"):
        rows[name] = [json.loads(ln) for ln in (work / name / "metrics.jsonl").read_text().splitlines()]
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows["two"], rows["one"]))
    later = rows["two"][1:] or rows["two"]
    out = {"status": "ok" if worst <= c["rel_tol"] else "failed", "stages": [first, "cpu"],
           "steps": len(rows["two"]), "loss_max_rel_diff": worst,
           "step_s": sorted(r["step_s"] for r in later)[len(later) // 2],
           "predicted_step_s": later[-1].get("predicted_step_s"), "seconds": two["seconds"]}
    if not run.cuda:
        out["reason"] = "dry run on the CPU: two CPU processes labelled as two kinds"
    return out


def wait_for_build(path: Path, limit_s: float) -> str:
    """The background build's last line once it wrote 'exit N', or a note that it did not finish."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        text = path.read_text(errors="replace") if path.is_file() else ""
        if m := re.search(r"^exit (\d+)$", text, flags=re.M):
            log(f"DeepSpeed CPU Adam build: exit {m.group(1)} (waited {time.perf_counter() - t0:.0f} s)")
            return f"exit {m.group(1)}"
        time.sleep(1.0)
    return f"not finished after waiting {limit_s:.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=list(MODES), default="full")
    p.add_argument("--out", required=True, help="folder for results.json, results.md and the plot")
    p.add_argument("--deadline-s", type=float, default=470.0, help="seconds from now when the last step must end")
    p.add_argument("--wait-file", help="before the peers, wait (up to 120 s) until this file holds a line "
                   "'exit N': run_all.sh's background build of DeepSpeed's CPU Adam")
    p.add_argument("--steps", nargs="*", default=["tests", "mixed", "peers", "predictor", "capacity", "bound"],
                   help="run only these steps, in this order")
    p.add_argument("--replot", metavar="RESULTS_JSON", help="only write results.md and the plots from this "
                   "results.json into --out")
    a = p.parse_args(argv)
    if a.replot:
        replot(Path(a.replot), Path(a.out))
        return 0
    start = time.perf_counter()
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    if a.mode != "dry" and not cuda:
        p.error(f"--mode {a.mode} needs a CUDA device; use --dry-run on a machine without one")
    cfg = MODES[a.mode]
    results = {"mode": a.mode, "machine": machine(), "steps": {}}
    log(f"machine: {json.dumps(results['machine'])}")

    def save() -> None:
        results["seconds"] = round(time.perf_counter() - start, 1)
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
        (out_dir / "results.md").write_text(markdown(results))

    steps = {"tests": step_tests, "mixed": step_mixed, "peers": step_peers, "bound": step_bound,
             "predictor": step_predictor, "capacity": step_capacity}
    unknown = sorted(set(a.steps) - set(steps))
    if unknown:
        p.error(f"unknown steps {unknown}; choose from {list(steps)}")
    with tempfile.TemporaryDirectory(prefix="hetrain-gpu-") as tmp:
        run = Run(cfg, cuda, Path(tmp), out_dir, start + a.deadline_s)
        for name in a.steps:
            if run.left_s() < (cfg["capacity"]["min_s"] if name == "capacity" else 10):
                results["steps"][name] = {"status": "skipped", "reason": "no time left before the deadline"}
                save()
                continue
            if name == "peers" and a.wait_file:
                results["deepspeed_build"] = wait_for_build(Path(a.wait_file), min(120.0, run.left_s() / 4))
            log(f"step {name}")
            t0 = time.perf_counter()
            try:
                results["steps"][name] = steps[name](run)
            except Exception as e:  # noqa: BLE001 - a broken step is reported; the others still run
                results["steps"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            results["steps"][name].setdefault("seconds", round(time.perf_counter() - t0, 1))
            log(f"step {name}: {results['steps'][name]['status']} in {results['steps'][name]['seconds']} s")
            save()
            if name == "peers" and run.cuda:
                plot_peers(results, out_dir / "peers.png")
    save()
    print(markdown(results), flush=True)
    failed = [n for n, s in results["steps"].items() if s["status"] == "failed"]
    log(f"done in {results['seconds']} s; failed steps: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
