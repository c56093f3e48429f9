"""The single-node offload Plan: per layer, where activations, weights and optimizer state live.

An OffloadPlan is what the offload planner hands the offload engine (hetrain.offload) and
what `hetrain plan` writes as plan.json: one LayerPlan per layer in execution order
(embedding, block.0 ... block.N-1, head), each saying whether the layer's activations are
kept for backward or recomputed, whether its compute-dtype weights stay on the device or are
streamed from pinned host memory just before each use, and whether its fp32 master weights
and Adam state live on the device (updated there) or on the host (updated by the CPU); plus
the streaming and overlap settings and the device budget the plan was made for. Predicted
figures are optional: the planner fills them in for reading and for predicted-against-
measured reports. This module only holds, checks, converts and prints data: it must not
plan, predict or touch tensors.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass, field

from hetrain.files import write_atomic
from hetrain.units import fmt_bytes

PLAN_FORMAT = "hetrain.offload_plan/1"
ACT_CHOICES = ("keep", "recompute")
PLACE_CHOICES = ("device", "host")


@dataclass
class LayerPlan:
    """What to do with one layer: the embedding, one transformer block, or the output head."""

    name: str
    """'embedding', 'block.<i>' or 'head'."""
    act: str = "keep"
    """'keep': tensors saved for backward stay on the device until backward uses them;
    'recompute': only the block's input is kept and its forward runs again in backward
    (blocks only)."""
    weights: str = "device"
    """'device': compute-dtype weights stay resident on the device; 'host': they live in
    pinned host memory and are copied into a device buffer before each forward and backward
    use, then the buffer is reused."""
    optim: str = "device"
    """'device': fp32 master weights and Adam state on the device, updated there; 'host':
    on the host, updated by the CPU optimizer worker from gradients offloaded in backward."""
    predicted_device_bytes: int | None = None
    """Planner's figure: device bytes this layer holds at the step's peak (optional)."""
    predicted_s: float | None = None
    """Planner's figure: this layer's share of the step time in seconds (optional)."""


@dataclass
class OffloadPlan:
    """Per-layer placement for one node, plus the engine's streaming and overlap settings."""

    layers: list[LayerPlan]
    """One entry per layer in execution order: embedding, block.0 ... block.N-1, head."""
    prefetch_depth: int = 1
    """How many upcoming uses of streamed weights are copied ahead of the one computing."""
    weight_buffers: int = 2
    """Preallocated device buffers for streamed weights, each the size of the largest
    streamed layer; at least prefetch_depth + 1 when any layer streams its weights."""
    overlap: bool = True
    """Cross-iteration overlap: a step returns while the CPU optimizer is still updating, and
    the next forward waits per layer for just that layer's update (lowest layer first)."""
    device_budget_bytes: int | None = None
    """The device memory the plan must fit; the engine counts every byte it holds on the
    device and raises past it. None: no limit (bytes are still counted)."""
    predicted_step_s: float | None = None
    predicted_peak_device_bytes: int | None = None
    predicted_host_bytes: int | None = None
    note: str = ""
    """Why this plan: the planner's one-paragraph explanation, printed under the table."""
    search: dict = field(default_factory=dict)
    """How the plan was found (solver, time, candidates), for reading."""
    made_for: dict | None = None
    """The model shape and batch the plan was made for (see `shape_of`); a run of another model
    or batch refuses it, naming the difference. None for a plan built by hand, which is only
    checked for its number of blocks."""

    # --- construction ------------------------------------------------------------------
    @staticmethod
    def layer_names(n_blocks: int) -> list[str]:
        return ["embedding", *(f"block.{i}" for i in range(n_blocks)), "head"]

    @classmethod
    def resident(cls, n_blocks: int, **settings) -> "OffloadPlan":
        """Everything on the device, activations kept: plain training under the engine."""
        return cls([LayerPlan(name) for name in cls.layer_names(n_blocks)], **settings)

    @classmethod
    def prefix_suffix(cls, n_blocks: int, recompute: int = 0, stream: int = 0, cpu_optim: int = 0,
                      **settings) -> "OffloadPlan":
        """AutoHete's plan shape: recompute the first `recompute` blocks, stream the weights
        of the first `stream` blocks, update the last `cpu_optim` blocks on the CPU.

        The earliest blocks' activations live longest and their weights are needed first in
        forward and last in backward, so checkpointing and weight streaming pay most there;
        the latest blocks' gradients arrive first in backward, so their CPU updates have the
        most time to hide. Embedding and head stay resident; change them with `layer(name)`.
        """
        for name, count in (("recompute", recompute), ("stream", stream), ("cpu_optim", cpu_optim)):
            if not 0 <= count <= n_blocks:
                raise ValueError(f"{name}={count} must be between 0 and the number of blocks ({n_blocks})")
        plan = cls.resident(n_blocks, **settings)
        for i in range(n_blocks):
            layer = plan.block(i)
            layer.act = "recompute" if i < recompute else "keep"
            layer.weights = "host" if i < stream else "device"
            layer.optim = "host" if i >= n_blocks - cpu_optim else "device"
        return plan

    # --- access ------------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.layers) - 2

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in the plan; layers are {', '.join(l.name for l in self.layers)}")

    def block(self, i: int) -> LayerPlan:
        return self.layer(f"block.{i}")

    @property
    def streams_weights(self) -> bool:
        return any(layer.weights == "host" for layer in self.layers)

    def summary(self) -> str:
        """One line: which layers recompute, stream weights, update on the CPU (blocks as
        ranges; the embedding and the head by name)."""

        def count(pred) -> str:
            idx = [i for i, b in enumerate(self.layers[1:-1]) if pred(b)]
            ends = [layer.name for layer in (self.layers[0], self.layers[-1]) if pred(layer)]
            if not idx and not ends:
                return "none"
            if not idx:
                where = []
            elif len(idx) == 1:
                where = [f"block {idx[0]}"]
            elif idx == list(range(idx[0], idx[-1] + 1)):
                where = [f"blocks {idx[0]}-{idx[-1]}"]
            else:
                where = [f"blocks {', '.join(map(str, idx))}"]
            return f"{len(idx) + len(ends)} ({', '.join(where + ends)})"

        return (f"recompute {count(lambda b: b.act == 'recompute')}; "
                f"stream weights {count(lambda b: b.weights == 'host')}; "
                f"CPU optimizer {count(lambda b: b.optim == 'host')}")

    # --- checks ------------------------------------------------------------------------
    def check_made_for(self, shape: dict) -> None:
        """ValueError naming the first difference when the plan was made for another model or
        batch than `shape` (see `shape_of`); nothing for a hand-built plan (made_for None)."""
        if self.made_for is None:
            return
        for key in sorted(set(self.made_for) | set(shape)):
            if self.made_for.get(key) != shape.get(key):
                raise ValueError(f"it was made for {key}={self.made_for.get(key)!r}, this run has "
                                 f"{shape.get(key)!r}; re-plan with `hetrain plan` for this model and batch, or "
                                 f"drop --plan.file")


    def validate(self, n_blocks: int | None = None) -> None:
        """Raise ValueError naming the field to fix; `n_blocks` checks the plan fits a model."""
        if len(self.layers) < 2:
            raise ValueError("an offload plan lists at least the embedding and the head; build one with "
                             "OffloadPlan.resident(n_blocks)")
        if n_blocks is not None and self.n_blocks != n_blocks:
            raise ValueError(f"the plan has {self.n_blocks} blocks but the model has {n_blocks}; "
                             f"re-plan for this model (hetrain plan) or build OffloadPlan.resident({n_blocks})")
        for i, (layer, expected) in enumerate(zip(self.layers, self.layer_names(self.n_blocks))):
            if layer.name != expected:
                raise ValueError(f"layers[{i}] is named {layer.name!r}, expected {expected!r}: layers run "
                                 f"embedding, block.0 ... block.{self.n_blocks - 1}, head, in that order")
            for key, allowed in (("act", ACT_CHOICES), ("weights", PLACE_CHOICES), ("optim", PLACE_CHOICES)):
                value = getattr(layer, key)
                if value not in allowed:
                    raise ValueError(f"layer {layer.name}: {key}={value!r} is not one of {', '.join(allowed)}")
            if layer.act == "recompute" and not layer.name.startswith("block."):
                raise ValueError(f"layer {layer.name}: act='recompute' applies to transformer blocks only (the "
                                 f"embedding saves just token ids, and the head's backward follows its forward at "
                                 f"once); set act='keep'")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth={self.prefetch_depth} must be 0 or more")
        if self.streams_weights and self.weight_buffers < self.prefetch_depth + 1:
            raise ValueError(f"weight_buffers={self.weight_buffers} is too few for prefetch_depth="
                             f"{self.prefetch_depth}: one buffer holds the layer computing and one each layer "
                             f"fetched ahead; set weight_buffers >= {self.prefetch_depth + 1}")
        if self.weight_buffers < 0:
            raise ValueError(f"weight_buffers={self.weight_buffers} must be 0 or more")
        if self.device_budget_bytes is not None and self.device_budget_bytes <= 0:
            raise ValueError(f"device_budget_bytes={self.device_budget_bytes} must be positive, or None for no limit")

    # --- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, doc: dict) -> "OffloadPlan":
        doc = dict(doc)
        fmt = doc.pop("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise ValueError(f"not an offload plan of format {PLAN_FORMAT}: format is {fmt!r}")
        _check_keys(doc, cls, "plan")
        layers = []
        for i, raw in enumerate(doc.pop("layers", [])):
            _check_keys(raw, LayerPlan, f"layers[{i}]")
            layers.append(LayerPlan(**raw))
        plan = cls(layers=layers, **doc)
        plan.validate()
        return plan

    def save(self, path) -> None:
        """Write the plan as JSON, atomically (a temporary file, then a rename)."""
        self.validate()
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "OffloadPlan":
        try:
            with open(os.fspath(path), encoding="utf-8") as f:
                doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"offload plan '{path}' is not valid JSON ({e}); re-create it with `hetrain plan`") from None
        return cls.from_dict(doc)

    # --- printing ----------------------------------------------------------------------
    def table(self) -> str:
        """One row per layer (activation, weights, optimizer, predicted memory and time), then
        the settings, the predicted step figures and the planner's note."""
        head = ("layer", "activations", "weights", "optimizer", "pred. memory", "pred. time")
        rows = [head]
        for layer in self.layers:
            mem = fmt_bytes(layer.predicted_device_bytes) if layer.predicted_device_bytes is not None else "-"
            time_s = f"{layer.predicted_s * 1e3:.2f} ms" if layer.predicted_s is not None else "-"
            rows.append((layer.name, layer.act, layer.weights, layer.optim, mem, time_s))
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        budget = fmt_bytes(self.device_budget_bytes) if self.device_budget_bytes else "none"
        lines.append(f"{self.summary()}")
        lines.append(f"prefetch depth {self.prefetch_depth}, {self.weight_buffers} weight buffers, cross-iteration "
                     f"overlap {'on' if self.overlap else 'off'}, device budget {budget}")
        predicted = []
        if self.predicted_step_s is not None:
            predicted.append(f"step {self.predicted_step_s:.3f} s")
        if self.predicted_peak_device_bytes is not None:
            predicted.append(f"peak device {fmt_bytes(self.predicted_peak_device_bytes)}")
        if self.predicted_host_bytes is not None:
            predicted.append(f"host {fmt_bytes(self.predicted_host_bytes)}")
        if predicted:
            lines.append("predicted: " + ", ".join(predicted))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "max_seq_len", "pos", "norm",
              "mlp", "tie_embeddings", "bias")


def shape_of(model: dict, micro_batch: int, seq_len: int, dtype: str) -> dict:
    """What a plan depends on: the model's shape (`model` as dataclasses.asdict of a
    ModelConfig, or {'hf_config': ...} for a Hugging Face model, whose every config entry
    counts) and the micro-batch's shape and compute dtype, as flat 'model.x'/'train.x' keys."""
    if "hf_config" in model:
        shape = {f"model.hf.{k}": v for k, v in model["hf_config"].items()}
    else:
        shape = {f"model.{k}": model[k] for k in SHAPE_KEYS}
    return {**shape, "train.micro_batch": micro_batch, "train.seq_len": seq_len, "train.dtype": dtype}


def _check_keys(doc: dict, cls, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in doc:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
            raise ValueError(f"unknown key {key!r} in {where} of the offload plan{hint}")
