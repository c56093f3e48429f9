"""The profile file: this machine's fingerprint, and reading and writing its cached figures.

One JSON file per machine under `hardware.profile_dir`, named by a digest of the machine's
fingerprint (hostname, CPU model, cores, torch version, GPU name), in the `Profile` format of
hetrain.predict.cost, written atomically. A profile read on another machine than the one that
measured it is refused (its timings would describe the wrong hardware). Also what is read out
of the files: the matmul curves cluster plans use for the kinds profiled, and the table
`hetrain profile` prints. hetrain.predict.profiler measures; this module only stores and reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import socket
import sys
from pathlib import Path

import torch

from hetrain.errors import ConfigError
from hetrain.files import write_atomic
from hetrain.predict.cost import LayerTiming, ModelProfile, Profile, UpdateTiming

PROFILE_VERSION = 2
"""2: bf16 layers are timed from the step's one bf16 weight copy (hetrain.precision), not autocast
over fp32 weights; a version-1 file is refused with the command that remakes it."""


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_fingerprint() -> dict:
    return {"hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cores": os.cpu_count() or 1,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def describe_machine(machine: dict) -> str:
    gpu = machine.get("gpu") or "no GPU"
    return (f"{machine.get('hostname')} ({machine.get('cpu_model')}, {machine.get('cores')} cores, "
            f"{gpu}, torch {machine.get('torch')})")


def profile_path(profile_dir: str | os.PathLike, machine: dict) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(os.fspath(profile_dir))) / f"profile-{digest}.json"


def save_profile(profile: Profile, profile_dir: str | os.PathLike) -> Path:
    """Write the profile atomically (temporary file in the same folder, then rename)."""
    path = profile_path(profile_dir, profile.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": PROFILE_VERSION, **dataclasses.asdict(profile)}
    return write_atomic(path, json.dumps(doc, indent=1))


def _from_dict(doc: dict) -> Profile:
    """The inverse of dataclasses.asdict, with JSON's string keys turned back into ints."""
    doc = {k: v for k, v in doc.items() if k != "version"}
    doc["models"] = [ModelProfile(**{**m, **{k: LayerTiming(**m[k]) for k in ("embedding", "block", "head")}})
                     for m in doc["models"]]
    doc["cpu_adam_params_per_s"] = {int(k): v for k, v in doc["cpu_adam_params_per_s"].items()}
    for key in ("optimizer", "clip", "grad_accumulate"):
        doc[key] = UpdateTiming(**doc[key]) if doc.get(key) else None
    if doc["collective"]:
        doc["collective"]["seconds_by_bytes"] = {int(k): v for k, v in doc["collective"]["seconds_by_bytes"].items()}
    return Profile(**doc)


def read_profile(path: str | os.PathLike, machine: dict | None = None) -> Profile:
    """Load a profile file; ConfigError when it was measured on another machine than `machine`
    (default: this one), since its timings would describe the wrong hardware."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("version") != PROFILE_VERSION:
            raise ValueError(f"format version {doc.get('version')}, this hetrain reads {PROFILE_VERSION}")
        profile = _from_dict(doc)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read profile '{path}': {e}; re-run `hetrain profile`") from None
    here = machine or machine_fingerprint()
    if profile.machine != here:
        raise ConfigError(f"profile '{path}' was measured on {describe_machine(profile.machine)}, but this "
                          f"is {describe_machine(here)}; re-run `hetrain profile` on this machine")
    return profile


def load_profile(profile_dir: str | os.PathLike, machine: dict | None = None) -> Profile | None:
    """This machine's cached profile, or None when it has none yet or only one in an older format
    (said on stderr; `hetrain profile` remakes it)."""
    path = profile_path(profile_dir, machine or machine_fingerprint())
    if not path.is_file():
        return None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        version = json.loads(path.read_text(encoding="utf-8")).get("version")
        if isinstance(version, int) and version < PROFILE_VERSION:
            print(f"hetrain: ignoring the cached profile '{path}' (format {version}, made by an older hetrain); "
                  f"`hetrain profile` remakes it", file=sys.stderr)
            return None
    return read_profile(path, machine)


def require_profile(profile_dir: str | os.PathLike) -> Profile:
    """This machine's profile; ConfigError saying how to make one (and naming the machines whose
    profiles the folder does hold) when there is none."""
    here = machine_fingerprint()
    if (profile := load_profile(profile_dir, here)) is not None:
        return profile
    folder = Path(os.path.expanduser(os.fspath(profile_dir)))
    others = []
    for p in sorted(folder.glob("profile-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            others.append(describe_machine(json.loads(p.read_text(encoding="utf-8"))["machine"]))
    seen = f"; '{folder}' only holds profiles of {', '.join(others)}" if others else ""
    raise ConfigError(f"no profile of this machine, {describe_machine(here)}, in '{folder}'{seen}; run "
                      f"`hetrain profile` with the same --model.* and --train.* settings, or predict for a "
                      f"catalog kind with --hardware.device_kind")


def measured_curves(profile_dir: str | os.PathLike, dtype: str = "bf16") -> dict:
    """Matmul curves of the accelerator kinds whose profiles `profile_dir` holds (any machine's: a
    profile made on a GPU prices that kind in cluster plans), by kind name.

    Profiles made on a CPU are left out: their GEMM line is the whole machine at the profile's
    thread count, measured against the catalog's placeholder CPU peak, while a cluster file's cpu
    devices are processes whose rates the file declares (peak_fp32_tflops, mem_bw_gbytes_per_s);
    those are priced by the default CPU curve on the declared peak."""
    from hetrain.hardware.catalog import match_torch_name
    from hetrain.predict.roofline import curve_for

    curves = {}
    for path in sorted(Path(os.path.expanduser(os.fspath(profile_dir))).glob("profile-*.json")):
        try:
            profile = _from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        kind = None if profile.device == "cpu" else match_torch_name(profile.device)
        if kind is not None and profile.matmul:
            curves[kind.name] = curve_for(kind, profile.matmul, dtype)
    return curves


def format_profile(profile: Profile, entry: ModelProfile) -> str:
    """A table of the figures, and a list of what could not be measured and why."""
    m = entry.model
    what = (f"model {m['preset']} (n_layer={m['n_layer']}, d_model={m['d_model']})" if "hf_config" not in m else
            f"Hugging Face {m['hf_config'].get('model_type')} (one block of {m['hf_config'].get('num_hidden_layers')})")
    lines = [f"machine: {describe_machine(profile.machine)}; measured {profile.measured_at}",
             f"{what}, micro_batch="
             f"{entry.micro_batch}, seq_len={entry.seq_len}, dtype={entry.dtype}, threads={entry.threads}",
             f"  {'layer':<10} {'fwd ms':>9} {'bwd ms':>9} {'recompute ms':>13} {'saved MiB':>10}"]
    for name, t in (("embedding", entry.embedding), ("block", entry.block), ("head+loss", entry.head)):
        lines.append(f"  {name:<10} {t.fwd_s * 1e3:9.3f} {t.bwd_s * 1e3:9.3f} {t.recompute_s * 1e3:13.3f} "
                     f"{t.act_bytes / 2**20:10.2f}")
    for label, u in (("device AdamW step", profile.optimizer), ("clip_grad_norm_", profile.clip),
                     ("gradient accumulation", profile.grad_accumulate)):
        lines.append(f"{label}: {u.params_per_s / 1e6:.1f} M params/s, {u.per_tensor_s * 1e6:.1f} us/tensor, "
                     f"{u.per_call_s * 1e6:.1f} us/call")
    if profile.matmul:
        m = profile.matmul
        lines.append(f"matmul ({m['dtype']}): {1 / m['s_per_flop'] / 1e12:.2f} TFLOP/s for large GEMMs, "
                     f"{m['overhead_s'] * 1e6:.1f} us fixed per GEMM")
    lines.append("CPU fused AdamW: " + ", ".join(f"{t} threads {r / 1e6:.0f} M params/s"
                                                 for t, r in sorted(profile.cpu_adam_params_per_s.items())))
    lines += [f"copy {name}: {rate / 1e9:.2f} GB/s" for name, rate in profile.copy_bytes_per_s.items() if rate]
    if profile.collective:
        c = profile.collective
        lines.append(f"all-reduce ({c['backend']}, {c['world_size']} processes, algorithm bandwidth): " + ", ".join(
            f"{b / 2**20:g} MiB {b / s / 1e9:.2f} GB/s" for b, s in sorted(c["seconds_by_bytes"].items())))
    lines.append("not measured on this machine:" if profile.unmeasured else "everything was measured")
    lines += [f"  {k}: {why}" for k, why in profile.unmeasured.items()]
    return "\n".join(lines)
