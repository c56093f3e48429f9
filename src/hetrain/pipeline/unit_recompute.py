"""Selective recomputation inside blocks, and recomputation ahead of a backward (inside a wait or a collective).

`apply_unit_recompute(blocks, policies, ledger)` makes each block with a non-trivial policy
(hetrain.plan.cluster.recompute_plan.BlockPolicy) run its forward as the model's eight steps
(hetrain.model.gpt: norm1, qkv, attn, proj, norm2, up, act, down), each run of dropped units as
one torch.utils.checkpoint region (non-reentrant, random state preserved, so dropout replays
its masks) and every other step plainly. The operations are exactly the block's own forward,
so results are bitwise those of the block. It overrides `forward` on the block instances only;
the handle's `remove()` restores them.

A region placed in a WINDOW or COLLECTIVE also runs an `_Anchor` first: an autograd function
that saves an empty tensor inside the region, off the data path (the backward graph stays the
block's own, so gradients add up in the same order). `Recomputations` keeps the anchors of each
micro-batch's forward; reading an anchor's saved tensor makes torch's checkpoint recompute the
whole region at once, under a GraphExecGroup, and the backward of that micro-batch runs under
the same group, so torch uses the recomputed tensors instead of recomputing again:
- WINDOW regions, keyed by (stage, micro-batch): `recompute(...)` runs them ahead of the
  backward, while the stage waits for the gradient (hetrain.pipeline.overlap calls it);
- COLLECTIVE regions, keyed by (stage, micro-batch, block position in the chunk): `collective(...)`
  runs block j - 1's inside the backward of block j, while one of block j's tensor-parallel
  all-reduces is in flight (hetrain.pipeline.tensor_parallel calls it). The chunk's last block
  has no next block: its attention-side COLLECTIVE regions (norm1, qkv, attn) run inside its own
  MLP's all-reduce (mlp.up's input gradient, reduced before the attention's backward starts),
  its MLP-side ones are plain on-demand ones. Such regions never rerun a
  row-parallel all-reduce: `proj` is never a COLLECTIVE unit, and a region ending at proj or down
  ends after the projection, its residual dropout and add running outside (keeps_tail), so
  torch's early stop ends the recomputation before the projection.
A region not recomputed in time is recomputed by the backward on demand, as any checkpoint.
Recomputation forks the random state and restores it, so it never changes the masks of later
forwards.

This module wraps modules and triggers torch's recomputation; it must not communicate, choose
policies or know about schedules (hetrain.pipeline.overlap and tensor_parallel decide when to
call it).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.utils.checkpoint import GraphExecGroup, checkpoint

from hetrain.offload.checkpointing import RecomputeHandle, apply_recompute
from hetrain.plan.cluster.recompute_plan import COLLECTIVE, DEMAND, STEPS, WINDOW, BlockPolicy, keeps_tail

_PROJ = STEPS.index("proj")
OWN = "own"
"""Key suffix of the last block's attention-side COLLECTIVE regions (recomputed in its own MLP all-reduce)."""


def _step(block: nn.Module, name: str, h: torch.Tensor, x: torch.Tensor, rope) -> torch.Tensor:
    """One step of Block.forward; `x` is the block input (the proj step adds it back)."""
    if name in ("proj", "down"):
        return _tail(block, name, _head(block, name, h), x)
    if name == "norm1":
        return block.norm1(h)
    if name == "qkv":
        return block.attn.qkv(h)
    if name == "attn":
        return block.attn.attend(h, rope)
    if name == "norm2":
        return block.norm2(h)
    if name == "up":
        return block.mlp.up(h)
    return block.mlp.activate(h)  # act


def _head(block: nn.Module, name: str, h: torch.Tensor) -> torch.Tensor:
    """A row-parallel step's projection (its all-reduce under tensor parallelism)."""
    return block.attn.proj(h) if name == "proj" else block.mlp.down(h)


def _tail(block: nn.Module, name: str, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """What follows the projection in that step: its residual dropout, and for proj the residual
    add (for down, Block adds its branch input back)."""
    if name == "proj":
        return x + block.attn.resid_drop(out)
    return block.mlp.resid_drop(out)


class _Anchor(torch.autograd.Function):
    """Saves an empty tensor inside a checkpoint region: reading it back ahead of the backward
    makes the region recompute. Its output is used by nobody, so it never runs backward."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _Timed(contextlib.AbstractContextManager):
    """The recompute context of one region: adds its seconds to the ledger."""

    def __init__(self, ledger: "Recomputations"):
        self.ledger, self.start_s = ledger, 0.0

    def __enter__(self):
        self.start_s = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.ledger._ran(time.perf_counter() - self.start_s)


class Recomputations:
    """One rank's ledger: the anchors of each (stage index, micro-batch) forward (its WINDOW
    regions under that key, its COLLECTIVE regions under (stage index, micro-batch, block
    position in the chunk)), their GraphExecGroups, and the seconds spent recomputing ahead of
    backwards (in windows), inside tensor-parallel all-reduces, and on demand."""

    def __init__(self, full_rerun: bool = False) -> None:
        self.full_rerun = full_rerun
        """DEMAND regions rerun their whole forward (checkpoint's early_stop=False), all-reduces
        included: run.recompute_full_rerun, a baseline for comparison."""
        self._forward: tuple[int, int] | None = None
        self._backward: tuple[tuple[int, int], GraphExecGroup | None] | None = None
        """The (stage index, micro-batch) whose backward runs now, and its group."""
        self._anchors: dict[tuple, list] = {}
        self._groups: dict[tuple[int, int], GraphExecGroup] = {}
        self._place = DEMAND
        """Where the recomputation running now is: WINDOW (ahead), COLLECTIVE or DEMAND."""
        self._collective_ran_s = 0.0
        self.token = torch.zeros(0, requires_grad=True)
        """What each anchor saves (no bytes)."""
        self.ahead_s = 0.0
        """Seconds of recomputation run ahead of a backward (in `recompute`)."""
        self.demand_s = 0.0
        """Seconds of recomputation run inside backwards, on demand."""
        self.regions_ahead = 0
        self.regions_left = 0
        """Window regions the backward recomputed because the wait ended first."""
        self.collective_hidden_s = 0.0
        """Seconds of COLLECTIVE regions recomputed while their all-reduce was in flight."""
        self.collective_after_s = 0.0
        """Seconds of COLLECTIVE regions recomputed after their all-reduce ended (a region overran it)."""
        self.regions_collective = 0
        """COLLECTIVE regions recomputed inside all-reduces."""
        self.collective_left = 0
        """COLLECTIVE regions the backward recomputed on demand (the all-reduces ended first, or tp 1)."""

    @contextlib.contextmanager
    def forward(self, stage_index: int, micro_batch: int):
        """The forward of one micro-batch of one stage runs inside this."""
        self._forward = (stage_index, micro_batch)
        try:
            yield
        finally:
            self._forward = None

    def _anchor(self, position: tuple | None) -> None:
        """At the start of a region's forward (and of its recomputation, which must save what the
        forward saved): an anchor, noted in a forward as a WINDOW region's (position None) or as a
        COLLECTIVE region of the block at `position`: (p,) for the next block's all-reduces, (p, OWN)
        for the block's own MLP all-reduce (the chunk's last block's attention side)."""
        node = _Anchor.apply(self.token).grad_fn  # off the data path, so the backward graph is the block's own
        if self._forward is not None and node is not None:
            key = self._forward if position is None else (*self._forward, *position)
            self._anchors.setdefault(key, []).append(node)

    def _ran(self, seconds: float) -> None:
        if self._place == WINDOW:
            self.ahead_s += seconds
        elif self._place == COLLECTIVE:
            self._collective_ran_s += seconds
        else:
            self.demand_s += seconds

    def pending(self, stage_index: int, micro_batch: int) -> int:
        """Window regions of this micro-batch not recomputed yet."""
        return len(self._anchors.get((stage_index, micro_batch), ()))

    def recompute(self, stage_index: int, micro_batch: int, stop: Callable[[], bool]) -> int:
        """Recompute this micro-batch's window regions, last block first (the order its backward
        needs them), until `stop()` says the wait is over; the rest wait for the backward.
        Returns the regions recomputed."""
        key = (stage_index, micro_batch)
        anchors = self._anchors.get(key)
        if not anchors:
            return 0
        group = self._groups.setdefault(key, GraphExecGroup())
        done = 0
        self._place = WINDOW
        try:
            while anchors and not stop():
                node = anchors.pop()
                with group:
                    node.saved_tensors  # noqa: B018 - the read is what triggers the recomputation
                done += 1
        finally:
            self._place = DEMAND
        self.regions_ahead += done
        return done

    def collective(self, stage_index: int, position: int, side: str, in_flight: Callable[[], bool],
                   ended_s: Callable[[], float | None] | None = None) -> int:
        """Called inside a tensor-parallel all-reduce of the backward of block `position` of chunk
        `stage_index` (hetrain.pipeline.tensor_parallel's window; `side` "mlp" for mlp.up's input
        gradient, the first, "attn" for attn.qkv's): recompute, for the micro-batch whose backward
        runs, the block's own attention-side regions when it noted any (mlp side only: they are
        needed next), then the COLLECTIVE regions of the block before it, last region first,
        while in_flight(); the rest wait for the backward. A region's seconds count as hidden while
        the all-reduce is in flight: all of them when it still is at the region's end, else the
        share before `ended_s()` (when the all-reduce ended; none of them without it). Returns the
        regions recomputed."""
        if self._backward is None or self._backward[0][0] != stage_index:
            return 0
        key, group = self._backward
        own = self._anchors.get((*key, position, OWN), []) if side == "mlp" else []
        earlier = self._anchors.get((*key, position - 1), [])
        done = 0
        self._place = COLLECTIVE
        try:
            while (own or earlier) and in_flight():
                node = (own or earlier).pop()
                before_s, start = self._collective_ran_s, time.perf_counter()
                # The backward's group (autograd carries it into its threads); entered if not.
                with contextlib.nullcontext() if GraphExecGroup._get_current_group() is group else group:
                    node.saved_tensors  # noqa: B018 - the read is what triggers the recomputation
                ran_s, end = self._collective_ran_s - before_s, time.perf_counter()
                ended = None if in_flight() else (ended_s() if ended_s is not None else start)
                inside = 1.0 if ended is None else min(1.0, max(0.0, ended - start) / max(end - start, 1e-12))
                self.collective_hidden_s += ran_s * inside
                self.collective_after_s += ran_s * (1.0 - inside)
                done += 1
        finally:
            self._place = DEMAND
        self.regions_collective += done
        return done

    @contextlib.contextmanager
    def backward(self, stage_index: int, micro_batch: int):
        """The backward of one micro-batch of one stage runs inside this: under the group its
        regions were recomputed in ahead, or a new one when it has COLLECTIVE regions (recomputed
        inside it); its anchors are dropped after it."""
        key = (stage_index, micro_batch)
        self.regions_left += len(self._anchors.pop(key, ()))
        collective = [k for k in self._anchors if len(k) >= 3 and k[:2] == key]
        group = self._groups.pop(key, None)
        if group is None and collective:
            group = GraphExecGroup()
        self._backward = (key, group)
        try:
            with group if group is not None else contextlib.nullcontext():
                yield
        finally:
            self._backward = None
            for k in collective:
                self.collective_left += len(self._anchors.pop(k))


def _run_steps(block: nn.Module, first: int, last: int, rope, anchor: Callable[[], None] | None, cut: bool,
               h: torch.Tensor, x: torch.Tensor | None = None):
    """Steps first..last of `block`, the last without its tail when `cut`; returns h, or (h,
    proj's output) when proj is inside and not last."""
    if anchor is not None:
        anchor()
    x2 = None
    for k in range(first, last + 1):
        h = _head(block, STEPS[k], h) if cut and k == last else _step(block, STEPS[k], h, x, rope)
        if k == _PROJ:
            x2 = h
    return (h, x2) if first <= _PROJ < last else h


def _unit_forward(block: nn.Module, regions: dict[int, tuple[int, str]], ledger: Recomputations,
                  position: int, is_last: bool, x: torch.Tensor, rope=None) -> torch.Tensor:
    """Block.forward, step by step, each region under torch.utils.checkpoint. `position`: the
    block's place in its chunk; the chunk's last block has no next block, so its attention-side
    COLLECTIVE regions go to its own MLP all-reduce and its MLP-side ones are on demand."""
    contexts = functools.partial(_contexts, ledger)
    h, x2, k = x, None, 0
    while k < len(STEPS):
        if k not in regions:
            h = _step(block, STEPS[k], h, x, rope)
            x2 = h if k == _PROJ else x2
            k += 1
            continue
        last, place = regions[k]
        anchor = None
        if place == WINDOW:
            anchor = functools.partial(ledger._anchor, None)
        elif place == COLLECTIVE and not is_last:
            anchor = functools.partial(ledger._anchor, (position,))
        elif place == COLLECTIVE and last <= _PROJ:  # the last block's attention side
            anchor = functools.partial(ledger._anchor, (position, OWN))
        # A region ending at proj or down leaves that step's dropout and residual add outside
        # (keeps_tail): the mask is saved outside the region, so recomputing it never reruns
        # the projection and its all-reduce. A whole block on demand is torch's plain checkpoint.
        cut = keeps_tail(k, last, place)
        fn = functools.partial(_run_steps, block, k, last, rope, anchor, cut)
        args = (h, x) if k <= _PROJ <= last else (h,)
        # Only DEMAND regions may rerun their whole forward: every TP rank recomputes them at
        # the same point of its backward, so the row-parallel all-reduces they rerun line up.
        # WINDOW and COLLECTIVE regions run when a wait or an all-reduce lets them, which
        # differs between ranks; the planner allows them only where they do not drop proj's
        # output: their tail outside (keeps_tail) and early stop then keep them clear of proj's
        # and down's all-reduces (recompute_units.reruns_row_parallel).
        out = checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts,
                         early_stop=not (ledger.full_rerun and place == DEMAND))
        h, x2 = out if k <= _PROJ < last else (out, x2)
        if cut:
            h = _tail(block, STEPS[last], h, x)
        x2 = h if last == _PROJ else x2
        k = last + 1
    return x2 + h  # the MLP branch's residual add


def _contexts(ledger: Recomputations):
    return contextlib.nullcontext(), _Timed(ledger)


def apply_unit_recompute(blocks: list[nn.Module], policies: list[BlockPolicy],
                         ledger: Recomputations) -> RecomputeHandle:
    """Run each block's forward under its policy (kept blocks are left alone). `blocks` are one
    chunk's, in order: a block's COLLECTIVE regions are recomputed inside the next one's
    all-reduces (`Recomputations.collective`), the last block's inside its own MLP all-reduce
    (attention side) or on demand (MLP side)."""
    wrapped = []
    for position, (block, policy) in enumerate(zip(blocks, policies, strict=True)):
        if policy.is_keep:
            continue
        if "forward" in block.__dict__:
            raise ValueError("a block already has its forward replaced; apply recomputation once")
        regions = {a: (b, place) for a, b, place in policy.regions()}
        block.forward = functools.partial(_unit_forward, block, regions, ledger, position,
                                          position == len(blocks) - 1)
        wrapped.append(block)
    return RecomputeHandle(wrapped)


def apply_whole_recompute(blocks: list[nn.Module], policies: list[BlockPolicy]) -> RecomputeHandle:
    """Whole-block recomputation on demand for blocks of any class (a transformers decoder layer),
    as the offload engine does it (hetrain.offload.checkpointing.apply_recompute: the block's own
    forward, whatever its arguments, as one checkpoint region). ValueError for a policy that
    keeps some units or recomputes ahead of the backward: those need the steps of hetrain's GPT block."""
    for block, policy in zip(blocks, policies, strict=True):
        if not policy.is_keep and policy != BlockPolicy.whole(DEMAND):
            raise ValueError(f"a {type(block).__name__} recomputes whole blocks on demand only, not "
                             f"'{policy.describe()}'; re-plan with --plan.recompute whole")
    return apply_recompute(blocks, [i for i, policy in enumerate(policies) if not policy.is_keep])
