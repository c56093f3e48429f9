"""Training checkpoints with torch.distributed.checkpoint, written atomically; the model's export.

A checkpoint is a directory `run_dir/checkpoints/step_XXXXXXXX/` holding the DCP files
(model and optimizer state, RNG states) and `meta.json` (step, data reading position,
config, plan). It is written under a temporary name and renamed into place, so an
interrupted save never leaves a half checkpoint where a resume would look. This module
reads and writes checkpoints; it does not decide when to save or what a run does next.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from hetrain.errors import ConfigError

CKPT_DIR = "checkpoints"
META = "meta.json"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    step: int
    data_state: dict
    config: dict
    plan: dict | None
    saved_at: str
    format_version: int = FORMAT_VERSION


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with meta.json) in run_dir, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and "." not in p.name]
    return sorted((p for p in found if (p / META).is_file()), key=lambda p: p.name)


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call made without a process group; one process is a supported case."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def rng_state(cuda_if_initialized: bool = False) -> dict[str, torch.Tensor]:
    """The CPU random state, and CUDA's where CUDA is available (with `cuda_if_initialized`, only
    where this process has initialised it: a CPU rank on a GPU machine leaves CUDA alone)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and (torch.cuda.is_initialized() or not cuda_if_initialized):
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    """Set the random state `rng_state` returned (CUDA's where it holds one and CUDA is available)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """{'model': ..., 'optim': ...} by parameter name: what a checkpoint holds (DCP's layout)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def apply_training_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete what interrupted saves left in `root`: `step_N.tmpPID` and `step_N.oldPID`
    folders whose writing process is gone (or is this one), and the cluster runtime's
    `step_N.tmp` / `step_N.old` (one name for all its ranks; call this only where no other job
    writes into `root`). Returns what was removed."""
    removed = []
    for p in root.glob("step_*.*"):
        suffix = p.name.rsplit(".", 1)[1]
        for tag in ("tmp", "old"):
            rest = suffix[len(tag):]
            if suffix.startswith(tag) and (rest == "" or rest.isdigit()):
                if rest == "" or int(rest) == os.getpid() or not _alive(int(rest)):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


def save_checkpoint(run_dir: str | os.PathLike, state: dict, meta: CheckpointMeta, keep: int = 0) -> Path:
    """Write `state` ({'model', 'optim'}, see training_state) atomically; return the path.

    Only the newest `keep` checkpoints are kept (0: all); the leftovers of interrupted saves
    (see remove_stale_partials) go first."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(root)
    final = root / checkpoint_name(meta.step)
    tmp = partial_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_single_process():
        # One writer (rank 0 under data parallelism, which holds the full state): no collectives.
        dcp.save({**state, "rng": rng_state()}, checkpoint_id=str(tmp), no_dist=True)
    return publish(run_dir, tmp, final, meta, keep)


def partial_path(final: Path) -> Path:
    """Where a save of `final` is written before it is published (remove_stale_partials knows it)."""
    return final.with_name(f"{final.name}.tmp{os.getpid()}")


def publish(run_dir: str | os.PathLike, tmp: Path, final: Path, meta: CheckpointMeta, keep: int) -> Path:
    """Make the fully written `tmp` the checkpoint `final`: meta.json last (its presence marks
    the directory complete), then renamed into place (a step saved again is swapped in and the
    old one dropped), then only the newest `keep` checkpoints kept (0: all). One writer calls it."""
    (tmp / META).write_text(json.dumps(meta.__dict__, indent=1, default=str))
    if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old one
        old = final.with_name(f"{final.name}.old{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if keep > 0:
        for stale in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint directory a `run.resume` value names, checked to exist and look complete."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            raise ConfigError(f"--run.resume auto found no checkpoint in '{Path(run_dir) / CKPT_DIR}'; "
                              f"start a new run without --run.resume, or point --run.dir at a run with checkpoints")
        path = found[-1]
    else:
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"checkpoint '{resume}' does not exist; pass a checkpoint directory "
                              f"(run_dir/{CKPT_DIR}/step_N) or 'auto' to --run.resume")
    read_meta(path)
    if not (path / ".metadata").is_file():
        raise ConfigError(f"checkpoint '{path}' is incomplete or corrupt (no .metadata); "
                          f"resume from an earlier checkpoint with --run.resume PATH")
    return path


def read_meta(path: Path) -> CheckpointMeta:
    try:
        raw = json.loads((path / META).read_text())
        meta = CheckpointMeta(**raw)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint '{path}' is incomplete or corrupt (no {META}); "
                          f"resume from an earlier checkpoint with --run.resume PATH") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"checkpoint '{path}' has a corrupt {META} ({e}); "
                          f"resume from an earlier checkpoint with --run.resume PATH") from None
    if meta.format_version != FORMAT_VERSION:
        raise ConfigError(f"checkpoint '{path}' has format {meta.format_version}, this hetrain reads {FORMAT_VERSION}")
    return meta


def load_checkpoint(path: Path, state: dict) -> CheckpointMeta:
    """Load a checkpoint resolved by resolve_resume into `state`'s tensors in place (the dict
    training_state or an engine's state_dict returns) and restore the RNG."""
    meta = read_meta(path)
    state = {**state, "rng": rng_state()}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=True)  # every rank reads the whole state
    except (Exception, CheckpointException) as e:  # DCP's own exception derives from BaseException
        raise ConfigError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          f"resume from an earlier checkpoint with --run.resume PATH") from None
    restore_rng(state["rng"])
    return meta


HF_EXPORT = "hf_model"
"""The folder inside run.dir where a Hugging Face model's run writes its trained model."""


def export_model(model: nn.Module, run_dir: str | os.PathLike, hf_source: str = "") -> Path:
    """The trained weights at the end of a run: run_dir/model.safetensors, and for a Hugging
    Face model (`hf_source` its folder) first run_dir/hf_model, a transformers folder (config,
    safetensors, the source's tokenizer) that AutoModelForCausalLM.from_pretrained loads.
    model.safetensors is written last, so a run stopped before it exports again on resume.
    Returns the HF folder for a Hugging Face model, else model.safetensors."""
    run_dir = Path(run_dir)
    folder = None
    if hf_source:
        from hetrain.model.hf_io import save_hf_model

        folder = save_hf_model(model, run_dir / HF_EXPORT, source=hf_source)
    path = export_safetensors(model, run_dir / "model.safetensors")
    return folder or path


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Model weights as safetensors (tied weights stored once), written atomically."""
    from safetensors.torch import save_model

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp), metadata={"format": "pt", "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    os.replace(tmp, path)
    return path
