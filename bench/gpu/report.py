"""The report of bench/gpu/gpu_evidence.py: results.json as markdown tables, and its plots.

`markdown(results)` is results.md; `plot_peers` draws tokens/s per system; `replot` writes
both again (and the bound plot) from a saved results.json. This module reads results; it
runs and measures nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

GIB = 2**30


def gib(n: float | None) -> str:
    return "-" if not n else f"{n / GIB:.2f} GiB"


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# hetrain GPU evidence ({results['mode']})", "",
             f"{m.get('gpu', 'no GPU')}, driver {m.get('driver', '-')}; {m.get('cpu', '')}, {m['cpu_cores']} cores, "
             f"{m['host_ram_gib']} GiB RAM; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}, "
             f"DeepSpeed {m['deepspeed']}; {m['date']} {m['time_utc']} UTC; hetrain {m['commit']}", "",
             "| step | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, s in results["steps"].items():
        note = s.get("reason") or s.get("error") or ""
        if name == "mixed" and "loss_max_rel_diff" in s:
            note = (f"stages {' + '.join(s['stages'])}: losses of {s['steps']} steps equal one process's to "
                    f"{s['loss_max_rel_diff']:.1e}; step {s['step_s'] * 1e3:.1f} ms (predicted "
                    f"{(s.get('predicted_step_s') or 0) * 1e3:.1f} ms)")
        if name == "tests":
            note = ", ".join(f"{v} {k}" for k, v in s.get("counts", {}).items()) + (
                f"; failed: {', '.join(s['failed'])}" if s.get("failed") else "")
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '-')} | {note} |")
    peers = results["steps"].get("peers")
    if peers and peers.get("rows"):
        st = peers["setting"]
        lines += ["", f"## Peers: {st['model']}, micro-batch {st['micro_batch']} x {st['seq_len']} tokens, "
                  f"GPU cap {st['cap_gib']} GiB", "",
                  "| system | tokens/s | step s | hetrain / this | max allocated | device busy | setup s | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in peers["rows"]:
            ratio = f"{r['hetrain_ratio']:.2f}" if "hetrain_ratio" in r else "-"
            notes = r.get("notes", {})
            busy = notes.get("profiled_step", {}).get("device_busy_share")
            note = r.get("error") or notes.get("plan", "")
            if "weight_wait_s" in notes:
                note += f"; main thread waited for weights {max(notes['weight_wait_s'][-3:]):.3f} s per step"
            lines.append(f"| {r['system']} | {r.get('tokens_per_s', 0):,.0f} | {r.get('step_s', 0):.3f} | {ratio} | "
                         f"{gib(r.get('max_allocated_bytes'))} | {'-' if busy is None else f'{busy:.0%}'} | "
                         f"{r.get('setup_s', 0):.1f} | {note} |")
    bound = results["steps"].get("bound")
    if bound and bound.get("rows"):
        lines += ["", "## Offload engine at a quarter of plain training's memory, against its plan's lower bound", "",
                  "| config | params | budget | bound ms (by) | engine ms | ratio | predicted ms | ledger peak | "
                  "allocator peak | plain ms |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bound["rows"]:
            if "engine_s" not in r:
                lines.append(f"| {r['config']} | {r['params'] / 1e6:.0f}M | {gib(r['budget'])} | "
                             f"{r.get('error', 'did not run')} |||||||")
                continue
            lines.append(f"| {r['config']} | {r['params'] / 1e6:.0f}M | {gib(r['budget'])} | "
                         f"{r['bound_s'] * 1e3:.1f} ({r['bound_by']}) | {r['engine_s'] * 1e3:.1f} | "
                         f"{r['engine_s'] / r['bound_s']:.2f} | {r['predicted_s'] * 1e3:.1f} | {gib(r['ledger_peak'])} | "
                         f"{gib(r.get('allocator_peak'))} | {r['plain_s'] * 1e3:.1f} |")
    pred = results["steps"].get("predictor")
    if pred and pred.get("rows"):
        lines += ["", "## Predictor: predicted against measured", "",
                  "| config | pred step ms | meas step ms | ratio | pred peak | meas peak | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in pred["rows"]:
            lines.append(f"| {r['config']} | {r['pred_step_s'] * 1e3:.1f} | {r['meas_step_s'] * 1e3:.1f} | "
                         f"{r['pred_step_s'] / r['meas_step_s']:.3f} | {gib(r['pred_peak_bytes'])} | "
                         f"{gib(r['meas_peak_bytes'])} | {r['pred_peak_bytes'] / r['meas_peak_bytes']:.3f} |")
    cap = results["steps"].get("capacity")
    if cap and cap.get("rows"):
        st = cap["setting"]
        lines += ["", f"## Largest model under a {st['cap_gib']} GiB cap ({st['width']}, blocks varied, "
                  f"micro-batch {st['micro_batch']} x {st['seq_len']})", "",
                  "| system | largest trained | params | smallest failed | exact | hetrain / this | trials |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in cap["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['system']} | skipped: {r['skipped']} ||||||")
                continue
            ratio = f"{r['hetrain_ratio']:.2f}" if "hetrain_ratio" in r else "-"
            failed = r["smallest_failed_layers"] if r["smallest_failed_layers"] is not None else (
                f"none up to {r['searched_to']}")
            lines.append(f"| {r['system']} | {r['largest_layers']} blocks | {r['largest_params'] / 1e9:.2f}B | "
                         f"{failed} | {'yes' if r['exact'] else 'no'} | {ratio} | {len(r['trials'])} |")
    return "\n".join(lines) + "\n"


def plot_peers(results: dict, path: Path) -> None:
    """Tokens/s of each system in the peers step, with hetrain's ratio over each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers, m = results["steps"]["peers"], results["machine"]
    rows = [r for r in peers["rows"] if r.get("ok")]
    if not rows:
        return
    st = peers["setting"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bars = ax.bar([r["system"] for r in rows], [r["tokens_per_s"] for r in rows],
                  color=["tab:green" if r["system"] == "hetrain" else "tab:gray" for r in rows])
    ax.bar_label(bars, labels=[f"hetrain x{r['hetrain_ratio']:.2f}" if "hetrain_ratio" in r else
                               f"{r['tokens_per_s']:,.0f}" for r in rows], fontsize=8, padding=2)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{st['model'].get('model.preset', st['model'])}, batch {st['micro_batch']}x{st['seq_len']}, "
                 f"GPU cap {st['cap_gib']} GiB\n{m.get('gpu', 'CPU')}, torch {m['torch']}, {m['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(results_path: Path, out_dir: Path) -> None:
    """results.md and the plots again from a results.json (bound.png needs the bound rows)."""
    from bench_offload_bound import plot as plot_bound

    results = json.loads(results_path.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(markdown(results))
    if results["steps"].get("peers", {}).get("rows"):
        plot_peers(results, out_dir / "peers.png")
    bound = results["steps"].get("bound", {}).get("rows")
    if bound:
        m = results["machine"]
        plot_bound(bound, str(out_dir / "bound.png"), f"offload engine at 25% of plain training's memory "
                   f"({m.get('gpu', 'CPU')}, torch {m['torch']}, {m['date']})")
