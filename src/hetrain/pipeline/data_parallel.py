"""Gradients across replicas and pipelines: after it, every rank holds what one process would.

After a schedule step each rank holds its chunks' gradients for its replica's micro-batches
(their mean). `GradientSync.reduce` then makes them the gradients of the whole global batch:

1. replicas of a stage: a bucketed all-reduce over its DP group (the kind's native backend),
   scaled by share / dp, where share is the pipeline's part of the global batch (1 with one
   pipeline). Under ZeRO-1 with one pipeline (`GradientSync.owner_of`), each parameter's
   gradient is reduced to the replica that updates it instead (`reduce_to_owners`: one reduce
   per owner and bucket): a ring reduce moves about half the bytes of an all-reduce, and the
   others' copies of that gradient are left partial (nothing reads them: the norm counts each
   parameter on its owner). The tied matrix is all-reduced, as its tie sum needs it whole.
   It runs after the backward, or, when the plan says so (plan.options overlap_grad_reduce, as
   the planner priced it), overlapped with the backward by `OverlappedReduce`: in each chunk's
   last backward of the step, a block's gradients (the embedding's and the head's each one
   bucket too) are divided and reduced in place, asynchronously, one collective per tensor,
   as soon as their accumulation ends, while the backward of the blocks before it runs;
   `reduce` waits for them. The tied matrix and parameters a rank holds in several chunks are
   reduced after the backward, as before. Each element is divided and summed as when reducing
   afterwards (the same bits at 2 replicas; with more, gloo's ring may add an element's parts in
   another order, depending on its place in the bucket);
2. tied embeddings: the first and last stage of a lane each hold a copy of the shared matrix;
   their gradients are summed over the lane's tie group (host-staged across kinds);
3. several pipelines (as the planner emits them for several kinds): every rank holding a part
   of the model, in every pipeline, all-reduces that part's whole gradient (TP shards gathered,
   rows in the model's order) weighted by its pipeline's token share, over the part's exchange
   group, through host memory between kinds; each rank keeps its own shard of the sum.

`local_sq_norm` is this rank's share of the squared global gradient norm: the runtime sums it
over all ranks with the step's loss and clips like torch.nn.utils.clip_grad_norm_.
`ShardedUpdate` is ZeRO-1's sharing out of the update. This module must not run the schedule or
step the optimizer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from hetrain.model.gpt import ModelConfig
from hetrain.pipeline.communicator import NATIVE, Communicator, buckets, flatten, unflatten_into, units_of
from hetrain.pipeline.stages import ModelNames
from hetrain.pipeline.tensor_parallel import full_canonical, local_from_canonical


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class GradientSync:
    comm: Communicator
    named: list[tuple[str, torch.nn.Parameter]]
    """Every (name, parameter) of this rank's chunks, a tied matrix under both its names."""
    names: ModelNames
    """The whole model's units and tied matrix."""
    cfg: ModelConfig
    """hetrain's GPT config, for the TP row order (unused at TP 1)."""
    share: float
    """This pipeline's part of the global batch."""
    overlapped: "OverlappedReduce | None" = None
    """Step 1 overlapped with the backward (None: after it)."""
    owner_of: dict[int, int] | None = None
    """ZeRO-1 with one pipeline: by parameter id, the global rank of the replica that updates it,
    to which step 1 reduces its gradient (a parameter absent from it is all-reduced); None:
    every gradient is all-reduced."""

    def unique(self) -> list[torch.nn.Parameter]:
        seen, out = set(), []
        for _, p in self.named:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _grads(self) -> list[torch.Tensor]:
        for p in self.unique():
            if p.grad is None:  # a part this batch did not reach still takes part in the sums
                p.grad = torch.zeros_like(p)
        return [_local(p.grad) for p in self.unique()]

    @torch.no_grad()
    def reduce(self) -> None:
        comm, place = self.comm, self.comm.place
        grads = self._grads()
        if comm.dp is not None:
            done = self.overlapped.finish() if self.overlapped is not None else set()
            rest = [(p, g) for p, g in zip(self.unique(), grads) if id(p) not in done]
            owner_of = self.owner_of or {}
            comm.reduce_sum([g for p, g in rest if id(p) not in owner_of], comm.dp)
            reduce_to_owners([(p, g) for p, g in rest if id(p) in owner_of], owner_of, comm.dp.group)
        scale = self.share / place.dp
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if comm.tie is not None and self.names.tied:
            tied = [_local(p.grad) for name, p in self.named if name in self.names.tied]
            comm.reduce_sum(tied[:1], comm.tie)
        if comm.exchange:
            self._exchange()

    def _exchange(self) -> None:
        """Step 3: sum each unit's whole gradient over its holders in every pipeline."""
        comm, place = self.comm, self.comm.place
        holders_per_pipeline = place.dp * place.tp  # each holds the same pipeline gradient
        by_unit: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, p in sorted(self.named, key=lambda e: e[0]):
            by_unit.setdefault(self.names.unit_of(name), []).append((name, p))
        # Every unit's contribution first: a tied matrix takes part in two units with its value
        # from before either sum.
        work = []
        for unit in units_of(place):  # model order: the same collective order on every rank
            items = by_unit.get(unit, [])
            full = [full_canonical(n, p.grad, self.cfg, place.tp) / holders_per_pipeline for n, p in items]
            work.append((unit, items, full))
        for unit, _, full in work:
            comm.reduce_sum(full, comm.exchange[unit])
        for _, items, full in work:
            for (name, p), whole in zip(items, full):
                _local(p.grad).copy_(local_from_canonical(name, whole, p.grad, self.cfg, place.tp))

    @torch.no_grad()
    def local_sq_norm(self) -> float:
        """This rank's part of the squared global norm: its TP shards, its whole tensors on TP rank
        0 only, the tied matrix once (on the embedding's stage); 0 on every replica but the first
        of the first pipeline (the others hold the same gradients), except that a gradient
        reduced to its owner (`owner_of`) counts on that replica only."""
        place = self.comm.place
        owner_of, me = self.owner_of or {}, dist.get_rank()
        if place.pipeline != 0 or (place.replica != 0 and not owner_of):
            return 0.0
        total = torch.zeros((), dtype=torch.float64)
        seen = set()
        for name, p in self.named:
            if id(p) in seen or (self.names.tied and name == self.names.tied[1]):
                continue
            if (owner_of[id(p)] != me) if id(p) in owner_of else place.replica != 0:
                continue  # its owner counts it, or replica 0 does
            seen.add(id(p))
            g = p.grad
            sharded = isinstance(g, DTensor) and any(not isinstance(pl, Replicate) for pl in g.placements)
            if not sharded and place.tp_rank != 0:
                continue
            total += _local(g).double().pow(2).sum().cpu()
        return float(total)


@dataclass
class OverlappedReduce:
    """The replicas' reduction of step 1, bucket by bucket inside each chunk's last backward.

    `arm(chunk)` is called right before a chunk's last backward of the step (hetrain.pipeline.
    overlap); from then on each parameter's post-accumulate-grad hook counts down its bucket, and
    a bucket whose parameters all hold their final gradient is divided by the micro-batch count
    in place (what torch's schedule would do to .grad after the last backward: `scaled` names
    them, and the stages' scale_grads skips them) and reduced asynchronously in place, one
    collective per gradient tensor: all-reduced, or reduced to its owner under ZeRO-1
    (`owner_of`). No copies: the memory is the gradients'. `finish()` waits and returns the ids
    of the parameters it reduced; the rest (the tied matrix, parameters in several chunks of this
    rank, a bucket whose parameters got no gradient) GradientSync reduces after the backward."""

    group: dist.ProcessGroup
    buckets: dict[int, list[list[torch.nn.Parameter]]]
    """Per chunk index, its buckets (one per unit: a block, the embedding, the head)."""
    n_microbatches: int
    owner_of: dict[int, int] | None = None
    """GradientSync.owner_of: reduce each parameter's gradient to its owner instead of all-reducing."""
    _owner: dict[int, tuple[int, int]] = field(default_factory=dict)
    _left: dict[tuple[int, int], int] = field(default_factory=dict)
    _armed: set = field(default_factory=set)
    scaled: set = field(default_factory=set)
    """Ids of the parameters whose gradients this step's reduction divided already (the stages'
    scale_grads must not divide them again; cleared by finish())."""
    _works: list = field(default_factory=list)
    _launched: int = 0
    _hooks: list = field(default_factory=list)
    last_step_buckets: int = 0
    """Buckets reduced inside the backward in the last step (of n_buckets)."""

    @property
    def n_buckets(self) -> int:
        return sum(len(b) for b in self.buckets.values())

    @classmethod
    def build(cls, sync: GradientSync, chunk_named: dict[int, list[tuple[str, torch.nn.Parameter]]],
              n_microbatches: int, on_cpu: bool = False) -> "OverlappedReduce | None":
        """None when this rank has no replicas to reduce with, reaches them through host memory,
        or is a CPU process (gloo would reduce on the cores the backward runs on, as the planner
        prices it) unless `on_cpu`."""
        dp = sync.comm.dp
        if dp is None or dp.route != NATIVE or (sync.comm.place.backend == "gloo" and not on_cpu):
            return None
        holders = Counter(pid for named in chunk_named.values() for pid in {id(p) for _, p in named})  # chunks per parameter
        tied = set(sync.names.tied or ())
        buckets: dict[int, list[list[torch.nn.Parameter]]] = {}
        for idx, named in chunk_named.items():
            by_unit: dict[str, list[torch.nn.Parameter]] = {}
            seen = set()
            for name, p in named:
                if name in tied or holders[id(p)] > 1 or id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                by_unit.setdefault(sync.names.unit_of(name), []).append(p)
            buckets[idx] = list(by_unit.values())
        out = cls(dp.group, buckets, n_microbatches, sync.owner_of)
        for idx, chunk_buckets in buckets.items():
            for b, params in enumerate(chunk_buckets):
                for p in params:
                    out._owner[id(p)] = (idx, b)
                    out._hooks.append(p.register_post_accumulate_grad_hook(out._ready))
        return out

    def arm(self, chunk: int) -> None:
        for b, params in enumerate(self.buckets.get(chunk, ())):
            self._left[chunk, b] = len(params)
        self._armed.add(chunk)

    def _ready(self, p: torch.nn.Parameter) -> None:
        key = self._owner[id(p)]
        if key[0] not in self._armed or key not in self._left:
            return
        self._left[key] -= 1
        if self._left[key] == 0:
            del self._left[key]
            self._launch(self.buckets[key[0]][key[1]])

    @torch.no_grad()
    def _launch(self, params: list[torch.nn.Parameter]) -> None:
        for p in params:
            g = _local(p.grad)
            g.div_(self.n_microbatches)
            if self.owner_of is None:
                work = dist.all_reduce(g, group=self.group, async_op=True)
            else:
                work = dist.reduce(g, dst=self.owner_of[id(p)], group=self.group, async_op=True)
            self._works.append(work)
            self.scaled.add(id(p))
        self._launched += 1

    @torch.no_grad()
    def finish(self) -> set[int]:
        for work in self._works:
            work.wait()
        done = set(self.scaled)
        self.scaled.clear()  # in place: the stages hold this set
        self.last_step_buckets, self._launched = self._launched, 0
        self._works.clear()
        self._left.clear()
        self._armed.clear()
        return done

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


@dataclass
class ShardedUpdate:
    """ZeRO-1 over a stage's replicas: each parameter is updated by one replica (`owner`), the only
    one holding its AdamW moments; after the step every replica broadcasts the weights it updated.

    Owners are given greedily by size over the parameters in name order, so every replica of a
    stage (same chunks, same TP shard shapes) computes the same partition without talking. Each
    gradient is whole on its owner: reduced to it with one pipeline (GradientSync.owner_of),
    all-reduced to every replica with several. In fp32 the weights stay whole (the forward
    computes from them), and the moments are what is sharded. In bf16, after `hold_masters`, the
    fp32 masters are sharded as well: a replica keeps the fp32 weights of its own share, and the
    bf16 weights the forward reads of every parameter (hetrain.precision.WeightCopies.held), one
    flat buffer per owner, which the owner fills by casting its masters after each step and
    broadcasts in bf16 straight into the others' buffers: 2 bytes a parameter plus the fp32
    gradient's 4, and 12 (master and moments) over the replicas, as Megatron's distributed
    optimizer keeps them; the cast runs on a 1/dp share. Under TP each rank's DP group holds the
    same TP shard, so the broadcasts move local shards."""

    link: object
    """The stage's DP link (hetrain.pipeline.communicator.Link)."""
    owned_by: list[list[torch.nn.Parameter]]
    """Per replica index in the DP group, the parameters it updates."""
    index: int
    """This rank's index in the DP group."""
    held: dict[int, torch.Tensor] = field(default_factory=dict)
    """After `hold_masters`: by parameter id, the bf16 weights the forward reads (views of `flats`)."""
    flats: list[torch.Tensor] = field(default_factory=list)
    """After `hold_masters`: per replica index, the flat bf16 buffer of the weights it owns."""

    @classmethod
    def build(cls, sync: GradientSync) -> "ShardedUpdate | None":
        """None without replicas (nothing to shard)."""
        dp = sync.comm.dp
        if dp is None or dp.size < 2:
            return None
        unique: dict[int, tuple[str, torch.nn.Parameter]] = {}
        for name, p in sync.named:
            unique.setdefault(id(p), (name, p))
        owned_by: list[list[torch.nn.Parameter]] = [[] for _ in range(dp.size)]
        load = [0] * dp.size
        for name, p in sorted(unique.values(), key=lambda e: e[0]):
            i = min(range(dp.size), key=lambda k: (load[k], k))
            owned_by[i].append(p)
            load[i] += _local(p).numel()
        return cls(dp, owned_by, dp.ranks.index(dist.get_rank()))

    @property
    def owned(self) -> list[torch.nn.Parameter]:
        return self.owned_by[self.index]

    @property
    def held_dtype(self) -> torch.dtype | None:
        """The dtype `hold_masters` holds the weights in (None: not called; fp32 weights are broadcast)."""
        return self.flats[0].dtype if self.flats else None

    def owner_ranks(self, skip: set[int] = frozenset()) -> dict[int, int]:
        """By parameter id (but those in `skip`), the global rank of the replica that updates it."""
        return {id(p): self.link.ranks[i] for i, params in enumerate(self.owned_by) for p in params
                if id(p) not in skip}

    @property
    def masters_elsewhere(self) -> set[int]:
        """Ids of the parameters whose fp32 masters other replicas keep (none before `hold_masters`)."""
        return {id(p) for i, params in enumerate(self.owned_by) if i != self.index for p in params
                if id(p) in self.held}

    @torch.no_grad()
    def hold_masters(self, weights: list, dtype: torch.dtype) -> int:
        """Keep fp32 masters for this replica's share only: hold `dtype` weights of every parameter
        (one flat buffer per owner, cast from the masters now), give them to each chunk's
        WeightCopies (`weights`), and free the fp32 storage of the parameters other replicas own
        (their shapes stay; their gradients still accumulate in fp32). Call it once the weights
        are final (after a resume's load). Returns the bytes freed."""
        freed = 0
        for i, params in enumerate(self.owned_by):
            params = [p for p in params if p.is_floating_point()]  # WeightCopies casts these only
            locals_ = [_local(p) for p in params]
            flat = torch.empty(sum(t.numel() for t in locals_), dtype=dtype,
                               device=locals_[0].device if locals_ else None)
            offset = 0
            for p, local in zip(params, locals_):
                view = flat[offset:offset + local.numel()].view(local.shape)
                offset += local.numel()
                view.copy_(local)
                self.held[id(p)] = (view if not isinstance(p, DTensor) else
                                    DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                                       shape=p.shape, stride=p.stride()))
                if i != self.index:
                    freed += _free(p)
            self.flats.append(flat)
        for w in weights:
            w.held = self.held
        return freed

    @torch.no_grad()
    def broadcast(self) -> None:
        """Every replica's updated weights to the others (one flat broadcast per owner): the fp32
        weights, or after `hold_masters` the bf16 ones, cast by their owner into its flat buffer and
        received straight into the others'."""
        for i, params in enumerate(self.owned_by):
            if not params:
                continue
            if self.flats:
                flat = self.flats[i]
                if i == self.index:
                    for p in params:
                        if id(p) in self.held:
                            _local(self.held[id(p)]).copy_(_local(p))
                dist.broadcast(flat, src=self.link.ranks[i], group=self.link.group)
                continue
            locals_ = [_local(p) for p in params]
            flat = flatten(locals_) if i == self.index else torch.empty(
                sum(t.numel() for t in locals_), dtype=locals_[0].dtype, device=locals_[0].device)
            dist.broadcast(flat, src=self.link.ranks[i], group=self.link.group)
            if i != self.index:
                unflatten_into(flat, locals_)


def reduce_to_owners(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]], owner_of: dict[int, int],
                     group: dist.ProcessGroup):
    """Sum each (parameter, local gradient) over `group` onto the rank `owner_of` names for it: one
    reduce of a flat copy per owner and bucket of about GRADIENT_BUCKET_BYTES, owners in the order
    they first appear (the same on every replica); the owner copies each sum back into the
    gradients before the next copy is made."""
    by_owner: dict[int, list[torch.Tensor]] = {}
    for p, g in pairs:
        by_owner.setdefault(owner_of[id(p)], []).append(g)
    me = dist.get_rank()
    for dst, grads in by_owner.items():
        for bucket in buckets(grads):
            flat = flatten(bucket)
            dist.reduce(flat, dst=dst, group=group)
            if dst == me:
                unflatten_into(flat, bucket)


def _free(p: torch.nn.Parameter) -> int:
    """Free a parameter's storage, keeping its shape (autograd still accumulates its .grad); the
    bytes freed (0, and nothing done, when the storage also holds other tensors)."""
    local = _local(p)
    storage = local.untyped_storage()
    if storage.nbytes() != local.numel() * local.element_size():
        return 0
    if not storage.resizable():  # e.g. memory-mapped from a file: give it a storage of its own first
        p.data = torch.empty_like(p.data)
        storage = _local(p).untyped_storage()
    n = storage.nbytes()
    storage.resize_(0)
    return n
