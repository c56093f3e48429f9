"""Checkpoints of a multi-process cluster run, in the one-process format, with torch.distributed.checkpoint.

Every rank contributes its chunks' parameters (under ZeRO-1 in bf16, the fp32 masters of its
share: the replica that owns a parameter writes it) and AdamW state under the whole model's fully
qualified names, as whole tensors in the model's own row order (TP shards gathered and put
back in order): exactly the keys a one-process run writes (`model.<fqn>`,
`optim.state.<fqn>.{step,exp_avg,exp_avg_sq}`, `optim.param_groups`, `rng`;
hetrain.train.checkpoint). So any layout resumes any other: another PP/TP/DP split, another
plan, or one process with `hetrain train --run.resume`. Each rank also writes its random state
under `rng_by_place.<its place and layout>` (`rng_key`); a resume under the same layout restores
it, so dropout draws the masks the uninterrupted run would have drawn. Ranks holding the same tensor (replicas,
TP ranks, the two copies of a tied matrix) write it once: DCP keeps one writer per key.
Directories follow hetrain.train.checkpoint: written under a temporary name by all ranks
together, meta.json last, then renamed by rank 0, so a failed save never looks complete.

This module reads and writes state; it must not decide when to save. Whole tensors per rank are
simple and exact; at large scale DTensor-sharded keys would avoid gathering them (not done).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor, distribute_tensor

from hetrain.model.gpt import ModelConfig
from hetrain.pipeline.communicator import Communicator
from hetrain.pipeline.stages import ModelNames
from hetrain.pipeline.tensor_parallel import from_canonical, full_canonical, local_from_canonical
from hetrain.train import checkpoint as ckpt


def _param_groups(optimizer: torch.optim.Optimizer, names: ModelNames) -> list[dict]:
    """The one-process optimizer's param_groups (hetrain.train.trainer.make_optimizer: matrices
    decay, the rest does not): our hyper-parameters, the whole model's parameter names."""
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    decay_wd = max(g["weight_decay"] for g in optimizer.param_groups)
    return [{**hyper, "weight_decay": decay_wd, "params": list(names.decay)},
            {**hyper, "weight_decay": 0.0, "params": list(names.no_decay)}]


@torch.no_grad()
def training_state(named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                   names: ModelNames, cfg: ModelConfig, comm: Communicator,
                   held_elsewhere: set[int] = frozenset()) -> dict:
    """This rank's part of a checkpoint (collective over each stage's TP ranks). Parameters whose
    ids are in `held_elsewhere` (ZeRO-1's masters kept by another replica: the TP ranks of a
    replica own the same names) are written by their owners."""
    tp = comm.place.tp
    model, optim_state = {}, {}
    for name, p in sorted(named, key=lambda e: e[0]):
        if id(p) in held_elsewhere:
            continue
        model[name] = full_canonical(name, p.detach(), cfg, tp)
        state = optimizer.state.get(p)
        key = names.canonical(name)
        if state and key not in optim_state:
            optim_state[key] = {"step": state["step"].detach().cpu(),
                                "exp_avg": full_canonical(name, state["exp_avg"], cfg, tp),
                                "exp_avg_sq": full_canonical(name, state["exp_avg_sq"], cfg, tp)}
    out = {"model": model, "optim": {"state": optim_state},
           "rng_by_place": {rng_key(comm.place): ckpt.rng_state(cuda_if_initialized=True)}}
    if comm.place.rank == 0:
        out["optim"]["param_groups"] = _param_groups(optimizer, names)
        out["rng"] = {"cpu": torch.get_rng_state()}
    return out


def rng_key(place) -> str:
    """The key of a rank's random state in a checkpoint: its place and what it runs (blocks,
    micro-batches, samples), so that only a rank of the same layout finds it on resume. Under
    another layout a rank draws other masks than the run it resumes would have anyway."""
    blocks = "_".join(f"b{c.first_block}-{c.first_block + c.n_blocks - 1}{'e' if c.embedding else ''}"
                      f"{'h' if c.head else ''}" for c in place.chunks)
    return (f"P{place.pipeline}R{place.replica}S{place.stage}T{place.tp_rank}of{place.tp}_{blocks}_"
            f"mb{place.micro_batch}x{place.n_microbatches}_at{place.sample_start}")


def load_rng(path: Path, place) -> bool:
    """Restore this rank's random state (dropout masks) from the checkpoint when it holds one for
    a rank of this same place and layout; False, and nothing changed, when it does not."""
    key = rng_key(place)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    if f"rng_by_place.{key}.cpu" not in saved:
        return False
    state = {"cpu": torch.empty_like(torch.get_rng_state())}
    has_cuda = f"rng_by_place.{key}.cuda" in saved and torch.cuda.is_available()
    if has_cuda:
        state["cuda"] = torch.empty_like(torch.cuda.get_rng_state())
    with ckpt._quiet_single_process():
        dcp.load({"rng_by_place": {key: state}}, checkpoint_id=str(path), no_dist=True)
    ckpt.restore_rng(state)
    return True


def save(run_dir: Path, state: dict, meta: ckpt.CheckpointMeta, comm: Communicator, keep: int) -> Path:
    """Write a checkpoint with every rank; returns its directory (on every rank)."""
    root = Path(run_dir) / ckpt.CKPT_DIR
    final = root / ckpt.checkpoint_name(meta.step)
    tmp = root / f"{final.name}.tmp"  # one name for every rank (their pids differ)
    if comm.place.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_partials(root)  # this save's own leftover too
    dist.barrier(group=comm.control)
    dcp.save(state, checkpoint_id=str(tmp), process_group=comm.control)
    dist.barrier(group=comm.control)
    if comm.place.rank == 0:
        ckpt.publish(run_dir, tmp, final, meta, keep)
    dist.barrier(group=comm.control)
    return final


@torch.no_grad()
def load(path: Path, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
         names: ModelNames, cfg: ModelConfig, tp: int) -> None:
    """Load this rank's parameters, and the AdamW state of those its optimizer updates (all of them,
    or its share under ZeRO-1), from a checkpoint of any layout (no collectives)."""
    unique: dict[int, tuple[str, torch.nn.Parameter]] = {}
    for name, p in named:
        unique.setdefault(id(p), (name, p))
    want_model, want_optim = {}, {}
    for name, p in unique.values():
        shape = p.shape  # a DTensor's shape is the whole tensor's
        want_model[name] = torch.empty(shape, dtype=p.dtype)
        want_optim[names.canonical(name)] = {"step": torch.zeros((), dtype=torch.float32),
                                             "exp_avg": torch.empty(shape, dtype=p.dtype),
                                             "exp_avg_sq": torch.empty(shape, dtype=p.dtype)}
    state = {"model": want_model, "optim": {"state": want_optim}}
    try:
        with ckpt._quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        from hetrain.errors import ConfigError

        raise ConfigError(f"checkpoint '{path}' could not be read ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}); resume from another with --run.resume PATH") from None
    updated = {id(q) for group in optimizer.param_groups for q in group["params"]}
    for name, p in unique.values():
        whole = want_model[name].to(p.device)
        _local(p).copy_(local_from_canonical(name, whole, p, cfg, tp))
        if id(p) not in updated:
            continue
        saved = want_optim[names.canonical(name)]
        optimizer.state[p] = {"step": saved["step"].to(p.device),
                              "exp_avg": _like(name, saved["exp_avg"].to(p.device), p, cfg, tp),
                              "exp_avg_sq": _like(name, saved["exp_avg_sq"].to(p.device), p, cfg, tp)}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like(name: str, whole: torch.Tensor, p: torch.Tensor, cfg: ModelConfig, tp: int) -> torch.Tensor:
    ordered = from_canonical(name, whole, cfg, tp)
    if isinstance(p, DTensor):
        return distribute_tensor(ordered, p.device_mesh, p.placements, src_data_rank=None)
    return ordered


def load_whole_model(path: Path, model: nn.Module) -> nn.Module:
    """`model` (the whole model, freshly built) with the weights of a checkpoint of any layout, in
    one process (for the export)."""
    sd = {k: torch.empty_like(v) for k, v in model.state_dict().items()}
    with ckpt._quiet_single_process():
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(sd)
    return model
