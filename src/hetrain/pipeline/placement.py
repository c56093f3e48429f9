"""Where each process of a cluster plan runs: its pipeline, replica, stage, TP rank and device kind.

Reads the plain data of a cluster plan (hetrain.plan.cluster.plan, as `hetrain plan --cluster`
writes it) and the cluster it carries, and numbers the processes. Ranks run over the plan's
groups in cluster-file order (idle groups get no process), a group's devices node by node;
inside a group a pipeline's local stage j, replica r and tensor-parallel rank k sit on device
(j * dp + r) * tp + k, the placement the planner priced (hetrain.plan.cluster.cost): TP ranks
adjacent in a node, then the replicas of a stage. The global batch of a step is cut in plan
order: pipeline p takes the next dp x micro_batch x n_microbatches sequences, its replica r the
r-th run of micro_batch x n_microbatches of them.

Every check that a plan can run (the stage list, the layer coverage, the batch, the world size,
the devices) is a ConfigError with one line naming the fix, raised before any process group
exists. This module computes places only: it must not create process groups, touch a model, or
import a planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetrain.errors import ConfigError
from hetrain.hardware.catalog import get_kind
from hetrain.plan.cluster.plan import ClusterPlan
from hetrain.plan.cluster.recompute_plan import COLLECTIVE, NOT_COLLECTIVE, WINDOW, BlockPolicy, block_policies

# The vendor library of a catalog kind -> (torch device type, torch.distributed backend).
# ROCm builds of torch run RCCL behind the "nccl" backend name on "cuda" devices; HCCL needs
# torch_npu and is named here but untested.
_DEVICE_OF_BACKEND = {"gloo": ("cpu", "gloo"), "nccl": ("cuda", "nccl"), "rccl": ("cuda", "nccl"),
                      "hccl": ("npu", "hccl")}


@dataclass(frozen=True)
class Chunk:
    """One model chunk of a pipeline: a contiguous run of blocks (a virtual stage)."""

    index: int
    """Position in the pipeline's chunk order (torch's PipelineStage stage_index)."""
    first_block: int
    n_blocks: int
    n_recompute_blocks: int
    embedding: bool
    head: bool
    policies: tuple[BlockPolicy, ...] = ()
    """Each block's recomputation policy, in block order (hetrain.plan.cluster.recompute_plan)."""


@dataclass(frozen=True)
class Place:
    """One process: what it runs and with whom."""

    rank: int
    pipeline: int
    replica: int
    stage: int
    """Device stage in its pipeline (0 holds the embedding)."""
    tp_rank: int
    tp: int
    dp: int
    n_stages: int
    """Device stages of the pipeline (its chunks are n_stages x virtual_stages)."""
    virtual_stages: int
    group: str
    kind: str
    """The plan's device kind (a cluster file's `label` when it gives one)."""
    device_type: str
    """torch device type: cpu, cuda, npu."""
    backend: str
    """torch.distributed backend native to the kind."""
    chunks: tuple[Chunk, ...]
    micro_batch: int
    n_microbatches: int
    sample_start: int
    """First sequence of the global batch this replica trains on."""

    @property
    def samples(self) -> int:
        return self.micro_batch * self.n_microbatches

    @property
    def holds_embedding(self) -> bool:
        return any(c.embedding for c in self.chunks)

    @property
    def holds_head(self) -> bool:
        return any(c.head for c in self.chunks)


@dataclass(frozen=True)
class Layout:
    """Every process of a plan, by rank, and the batch it reads."""

    places: tuple[Place, ...]
    global_batch: int
    seq_len: int
    read_unit: int
    """Sequences per data read: the step reads global_batch / read_unit batches of this size,
    as a one-process run with --train.micro_batch read_unit --train.grad_accum that many does."""
    n_pipelines: int
    pipeline_samples: tuple[int, ...]
    """Sequences of the global batch each pipeline trains on (its token share x global_batch)."""

    @property
    def world(self) -> int:
        return len(self.places)

    def rank_of(self, pipeline: int, replica: int, stage: int, tp_rank: int) -> int:
        for p in self.places:
            if (p.pipeline, p.replica, p.stage, p.tp_rank) == (pipeline, replica, stage, tp_rank):
                return p.rank
        raise KeyError((pipeline, replica, stage, tp_rank))

    def pipeline_lane(self, place: Place) -> list[int]:
        """Ranks of the stages of `place`'s replica with its TP rank, in stage order."""
        return [self.rank_of(place.pipeline, place.replica, s, place.tp_rank) for s in range(place.n_stages)]

    def tp_ranks(self, place: Place) -> list[int]:
        return [self.rank_of(place.pipeline, place.replica, place.stage, k) for k in range(place.tp)]

    def dp_ranks(self, place: Place) -> list[int]:
        return [self.rank_of(place.pipeline, r, place.stage, place.tp_rank) for r in range(place.dp)]

    def replica_ranks(self, pipeline: int, replica: int) -> list[int]:
        return [p.rank for p in self.places if p.pipeline == pipeline and p.replica == replica]


def device_of_kind(catalog_kind: str) -> tuple[str, str]:
    """(torch device type, torch.distributed backend) of a catalog kind."""
    return _DEVICE_OF_BACKEND[get_kind(catalog_kind).collective_backend]


def _check_pipeline(p: int, pipe, n_layer: int) -> None:
    where = f"plan pipeline {p}"
    v = pipe.virtual_stages
    if v < 1 or len(pipe.stages) % v:
        raise ConfigError(f"{where} lists {len(pipe.stages)} chunks, not a multiple of its virtual_stages={v}; "
                          f"re-plan or fix the stage list")
    tps = {st.tp for st in pipe.stages} | set(pipe.tp)
    if len(tps) != 1:
        raise ConfigError(f"{where} mixes tensor-parallel degrees {sorted(tps)}; the runtime pairs stages TP rank by "
                          f"TP rank, so re-plan without --plan.mixed_tp (or pin one degree with --plan.tp N)")
    n_stages = len(pipe.stages) // v
    for c, st in enumerate(pipe.stages):
        if st.group != pipe.stages[c % n_stages].group:
            raise ConfigError(f"{where}: chunk {c} is on group '{st.group}' but runs on stage {c % n_stages} of group "
                              f"'{pipe.stages[c % n_stages].group}'; interleaved chunks of a stage share its group")
    first = 0
    for c, st in enumerate(pipe.stages):
        if st.first_block != first or st.n_blocks < 1 or not 0 <= st.n_recompute_blocks <= st.n_blocks:
            raise ConfigError(f"{where}: chunk {c} holds blocks {st.first_block}..+{st.n_blocks} (recompute "
                              f"{st.n_recompute_blocks}); chunks must cover the blocks in order from 0, at least "
                              f"one each")
        try:
            policies = block_policies(st.recompute, st.first_block, st.n_blocks, st.n_recompute_blocks)
        except ValueError as err:
            raise ConfigError(f"{where}: chunk {c}: {err}; re-plan or fix its recompute entry") from None
        if st.tp == 1 and any(p.units_at(COLLECTIVE) for p in policies):
            raise ConfigError(f"{where}: chunk {c} recomputes units inside tensor-parallel all-reduces "
                              f"('collective') but runs at tp 1, which has none; re-plan, or place them 'window' "
                              f"or 'demand' in its recompute entry")
        ahead = sorted({u for p in policies for u in p.units_at(WINDOW) if u in NOT_COLLECTIVE})
        if st.tp > 1 and ahead:
            raise ConfigError(f"{where}: chunk {c} recomputes {', '.join(ahead)} ahead of a backward ('window') at "
                              f"tp {st.tp}: that reruns a tensor-parallel all-reduce, and each TP rank stops "
                              f"recomputing ahead when its own gradient arrives, so the ranks' all-reduces would pair "
                              f"up wrongly; re-plan, or place {', '.join(ahead)} and the dropped units next to it "
                              f"'demand' in its recompute entry")
        if st.embedding != (c == 0) or st.head != (c == len(pipe.stages) - 1):
            raise ConfigError(f"{where}: the embedding must be on the first chunk and the head on the last")
        first += st.n_blocks
    if first != n_layer:
        raise ConfigError(f"{where} covers {first} blocks, the model has {n_layer}; re-plan for this model")
    if pipe.dp < 1 or pipe.micro_batch < 1 or pipe.n_microbatches < 1:
        raise ConfigError(f"{where} has dp={pipe.dp}, micro_batch={pipe.micro_batch}, "
                          f"n_microbatches={pipe.n_microbatches}; each must be at least 1")
    rounds = max(1, pipe.n_microbatches // n_stages)  # torch's interleaved 1F1B runs whole rounds
    if v > 1 and pipe.n_microbatches % rounds:
        raise ConfigError(f"{where}: interleaved 1F1B over {n_stages} stages needs a number of micro-batches that is "
                          f"a multiple of {rounds}, not {pipe.n_microbatches}; change --plan.global_batch or "
                          f"--plan.micro_batch")


def place_plan(plan: ClusterPlan) -> Layout:
    """Every process of the plan. ConfigError (one line) when the plan cannot run as written."""
    n_layer = int(plan.model["n_layer"])
    groups = {g["name"]: g for g in plan.cluster["group"]}
    owner: dict[str, int] = {}
    for p, pipe in enumerate(plan.pipelines):
        _check_pipeline(p, pipe, n_layer)
        for g in pipe.groups:
            if g not in groups:
                raise ConfigError(f"plan pipeline {p} uses group '{g}', which its cluster does not have")
            if g in owner:
                raise ConfigError(f"group '{g}' appears in pipelines {owner[g]} and {p}; a group serves one pipeline")
            owner[g] = p
    samples = [pipe.samples_per_step for pipe in plan.pipelines]
    if sum(samples) != plan.global_batch:
        raise ConfigError(f"the plan's pipelines train on {sum(samples)} sequences per step but its global_batch is "
                          f"{plan.global_batch}; re-plan")
    read_unit = min(pipe.micro_batch for pipe in plan.pipelines)
    if any(pipe.micro_batch % read_unit for pipe in plan.pipelines):
        read_unit = math.gcd(*(pipe.micro_batch for pipe in plan.pipelines))

    # Stage counts per group of each pipeline, and the first stage index of each group.
    stage_base: dict[str, tuple[int, int]] = {}  # group -> (first stage, stages)
    for pipe in plan.pipelines:
        n_stages = len(pipe.stages) // pipe.virtual_stages
        for s in range(n_stages):
            g = pipe.stages[s].group
            first, count = stage_base.get(g, (s, 0))
            if first + count != s:
                raise ConfigError(f"group '{g}' holds stages that are not contiguous in its pipeline; re-plan")
            stage_base[g] = (first, count + 1)

    places: list[Place] = []
    offsets = [0] + [sum(samples[:p + 1]) for p in range(len(samples))]
    for g in plan.cluster["group"]:
        name = g["name"]
        if name not in owner:
            continue  # idle: no process
        p = owner[name]
        pipe = plan.pipelines[p]
        tp, dp = pipe.stages[0].tp, pipe.dp
        first_stage, count = stage_base[name]
        devices = int(g["nodes"]) * int(g["devices_per_node"])
        if devices != count * dp * tp:
            raise ConfigError(f"group '{name}' has {devices} devices but the plan gives it {count} stages x dp {dp} x "
                              f"tp {tp}; re-plan for this cluster")
        device_type, backend = device_of_kind(g["kind"])
        n_stages = len(pipe.stages) // pipe.virtual_stages
        for d in range(devices):
            j, k = divmod(d, tp)
            j, r = divmod(j, dp)
            stage = first_stage + j
            chunks = tuple(Chunk(c, st.first_block, st.n_blocks, st.n_recompute_blocks, st.embedding, st.head,
                                 tuple(block_policies(st.recompute, st.first_block, st.n_blocks,
                                                      st.n_recompute_blocks)))
                           for c, st in enumerate(pipe.stages) if c % n_stages == stage)
            places.append(Place(
                rank=len(places), pipeline=p, replica=r, stage=stage, tp_rank=k, tp=tp, dp=dp, n_stages=n_stages,
                virtual_stages=pipe.virtual_stages, group=name, kind=g.get("label", g["kind"]),
                device_type=device_type, backend=backend, chunks=chunks, micro_batch=pipe.micro_batch,
                n_microbatches=pipe.n_microbatches,
                sample_start=offsets[p] + r * pipe.micro_batch * pipe.n_microbatches))
    return Layout(tuple(places), plan.global_batch, plan.seq_len, read_unit, len(plan.pipelines), tuple(samples))


def check_world(layout: Layout, world: int, plan_path: str) -> None:
    """ConfigError unless `world` processes were launched for the plan's devices."""
    if world == layout.world:
        return
    by_group: dict[str, int] = {}
    for p in layout.places:
        by_group[p.group] = by_group.get(p.group, 0) + 1
    groups = ", ".join(f"{g}: {n}" for g, n in by_group.items())
    launched = f"torchrun launched {world}" if world > 1 else "this is one process (no torchrun)"
    raise ConfigError(f"plan '{plan_path}' runs on {layout.world} processes ({groups}) but {launched}; start it with "
                      f"torchrun --nproc_per_node {layout.world} (one node) or N nodes x {layout.world} / N")


def check_device(place: Place, cuda_devices: int, local_rank: int) -> None:
    """ConfigError unless this process can reach the device kind the plan gives it."""
    if place.device_type == "cpu":
        return
    if place.device_type == "cuda" and local_rank < cuda_devices:
        return
    have = f"{cuda_devices} CUDA devices" if cuda_devices else "no CUDA device"
    raise ConfigError(f"rank {place.rank} runs a stage on group '{place.group}' ({place.kind}, a {place.device_type} "
                      f"kind) but this node has {have} for local rank {local_rank}; run the plan on the cluster it "
                      f"was made for, or plan for configs/clusters/local-cpu.toml to run on CPU processes")
