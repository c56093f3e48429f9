"""The cluster Plan format: plain dataclasses that save to JSON and load back.

A ClusterPlan is everything needed to re-predict (and later to execute) a hybrid-parallel
plan without re-planning: the model shape, the cluster (as data, so the plan travels
without its cluster file), the batch shape, the predictor's options, and one PipelinePlan
per pipeline shape, each replicated `dp` times, with its stages in order. The predicted
figures are stored too, for reading; loading re-predicts and they must agree. This module
only holds and converts data: it must not predict or search.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from hetrain.files import write_atomic

PLAN_FORMAT = "hetrain.cluster_plan/1"


@dataclass
class StagePlan:
    """One pipeline stage: a contiguous run of blocks on `tp` devices of one group."""

    group: str
    kind: str
    tp: int
    first_block: int
    n_blocks: int
    n_recompute_blocks: int
    """How many of the stage's blocks drop their activations and recompute them in backward."""
    embedding: bool = False
    head: bool = False
    recompute: dict = field(default_factory=dict)
    """The stage's recomputation policy per block and unit (hetrain.plan.cluster.recompute_plan); when
    given, n_recompute_blocks is 0. Empty: the first n_recompute_blocks blocks recompute whole."""


@dataclass
class PipelinePlan:
    """A pipeline shape replicated `dp` times; each replica takes micro_batch x n_microbatches samples."""

    groups: list[str]
    """Groups in stage order; each group's stages are contiguous."""
    tp: list[int]
    """Tensor-parallel degree per group of `groups`."""
    dp: int
    micro_batch: int
    n_microbatches: int
    stages: list[StagePlan]
    """Model chunks in model order. With virtual_stages v > 1 there are v chunks per device
    stage and chunk c runs on stage c mod (len(stages) / v) (interleaved 1F1B)."""
    virtual_stages: int = 1
    """Model chunks per device stage: 1 runs 1F1B, more runs interleaved 1F1B."""

    @property
    def samples_per_step(self) -> int:
        return self.dp * self.micro_batch * self.n_microbatches

    @property
    def devices(self) -> int:
        return self.dp * sum(s.tp for s in self.stages) // self.virtual_stages


@dataclass
class ClusterPlan:
    model: dict
    """ModelConfig fields, or a transformers model's summary (see `hf`)."""
    cluster: dict
    """The cluster as cluster-file data (hetrain.hardware.cluster.cluster_to_dict)."""
    global_batch: int
    seq_len: int
    options: dict
    """PredictorOptions fields."""
    pipelines: list[PipelinePlan]
    idle_groups: list[str] = field(default_factory=list)
    prediction: dict = field(default_factory=dict)
    """Predicted figures (PlanPrediction.to_dict()), stored for reading."""
    upper_bound: dict = field(default_factory=dict)
    """Per kind, the tokens/s of the best plan for that kind's devices alone, and their sum."""
    search: dict = field(default_factory=dict)
    """How the plan was found: search time, candidates examined."""
    hf: dict = field(default_factory=dict)
    """For a transformers model: {"path", "config"} (hetrain.model.spec); empty for hetrain's GPT."""

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict) -> "ClusterPlan":
        doc = dict(doc)
        fmt = doc.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"not a cluster plan of format {PLAN_FORMAT}: {fmt}")
        pipelines = [PipelinePlan(**{**p, "stages": [StagePlan(**s) for s in p["stages"]]})
                     for p in doc.pop("pipelines")]
        return cls(pipelines=pipelines, **doc)

    def save(self, path) -> None:
        """Write the plan as JSON (atomically: a temporary file, then a rename)."""
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "ClusterPlan":
        with open(os.fspath(path), encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def device_stages(pipe: PipelinePlan) -> list[list[StagePlan]]:
    """The chunks each device stage runs, stage by stage (one chunk each without virtual stages)."""
    n_stages = len(pipe.stages) // pipe.virtual_stages
    return [pipe.stages[s::n_stages] for s in range(n_stages)]


def fold(pipe: PipelinePlan) -> PipelinePlan:
    """An interleaved pipeline as its device stages (blocks and recomputation summed per stage):
    the 1F1B pipeline that the predictor prices. Unchanged without virtual stages."""
    if pipe.virtual_stages == 1:
        return pipe
    stages = [dataclasses.replace(chunks[0], n_blocks=sum(c.n_blocks for c in chunks),
                                  n_recompute_blocks=sum(c.n_recompute_blocks for c in chunks),
                                  embedding=any(c.embedding for c in chunks), head=any(c.head for c in chunks))
              for chunks in device_stages(pipe)]
    return dataclasses.replace(pipe, stages=stages, virtual_stages=1)


def interleave(pipe: PipelinePlan, virtual_stages: int) -> PipelinePlan:
    """The same pipeline with each device stage's blocks cut into `virtual_stages` chunks that
    run interleaved: chunk c (model order) runs on stage c mod S. Each stage keeps its block
    and recompute counts, spread as evenly as they go over its chunks; the first chunk keeps
    the embedding, the last the head. ValueError when a stage has fewer blocks than chunks."""
    if pipe.virtual_stages != 1:
        raise ValueError("the pipeline is interleaved already")
    v, n_stages = virtual_stages, len(pipe.stages)
    if v == 1:
        return pipe
    pieces: list[list[tuple[int, int]]] = []  # per stage, per round: (blocks, recomputed)
    for st in pipe.stages:
        if st.n_blocks < v:
            raise ValueError(f"stage of group '{st.group}' holds {st.n_blocks} blocks, fewer than "
                             f"{v} virtual stages; use fewer virtual stages")
        blocks = [st.n_blocks // v + (1 if i < st.n_blocks % v else 0) for i in range(v)]
        left, recompute = st.n_recompute_blocks, []
        for b in blocks:
            recompute.append(min(b, left))
            left -= recompute[-1]
        pieces.append(list(zip(blocks, recompute)))
    chunks, first = [], 0
    for rnd in range(v):
        for s_idx, st in enumerate(pipe.stages):
            n, r = pieces[s_idx][rnd]
            chunks.append(StagePlan(st.group, st.kind, st.tp, first, n, r,
                                    embedding=rnd == 0 and s_idx == 0,
                                    head=rnd == v - 1 and s_idx == n_stages - 1))
            first += n
    return dataclasses.replace(pipe, stages=chunks, virtual_stages=v)
