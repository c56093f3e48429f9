"""What is trained: the model (hetrain's GPT or a transformers causal LM in a local folder) and
the batch shape, as plain data that every floor below the trainer takes instead of the Config.

`ModelSpec` is also what a cluster plan records of its model. hetrain's GPT is recorded by its
ModelConfig fields (plan.model). A transformers causal LM (`--hf.path DIR`) is recorded by its
folder and its architecture, the config without the entries that say where or by which version
it was written (plan.hf = {"path", "config"}; hetrain.model.hf.config_key), beside a summary in
plan.model (preset 'hf:<folder name>', n_layer, d_model, n_head, vocab_size) that reports read.
The description is rebuilt from the record alone, so a plan is re-predicted without its folder;
the runtime checks that the folder still holds the architecture the plan was made for. The same
record keys a profile entry (`key()`).

What hetrain's cluster runtime runs of a transformers model differs from its GPT: tensor
parallelism for Llama-style layers only (the description's tp_heads is 1 for the others) and
whole-block recomputation only (`unit_recompute` False: the units inside a block are the GPT's
steps). This module is data and
arithmetic: it must not search, price or run anything.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from hetrain.errors import ConfigError
from hetrain.model.describe import ModelDescription, describe_model
from hetrain.model.gpt import ModelConfig


@dataclass(frozen=True)
class BatchShape:
    """One micro-batch's shape and the compute dtype, and the micro-batches per step."""

    micro_batch: int
    seq_len: int
    dtype: str = "fp32"
    """'fp32', or 'bf16' (fp32 masters, one bf16 copy of the weights per step read under autocast:
    hetrain.precision; the offload engine streams bf16 weights)."""
    grad_accum: int = 1

    @property
    def dtype_bytes(self) -> int:
        """Bytes of one compute element (the description's compute_dtype_bytes)."""
        return 2 if self.dtype == "bf16" else 4


@dataclass(frozen=True)
class ModelSpec:
    record: dict
    """plan.model: ModelConfig fields, or a transformers model's summary."""
    hf: dict = field(default_factory=dict)
    """plan.hf: {"path", "config"} of a transformers model; empty for hetrain's GPT."""

    @classmethod
    def gpt(cls, cfg: ModelConfig) -> "ModelSpec":
        return cls(dataclasses.asdict(cfg))

    @classmethod
    def hf_folder(cls, path: str) -> "ModelSpec":
        """The transformers model at `path` (config.json is enough); ConfigError as --hf.path's."""
        from hetrain.model.hf import config_key, load_hf_config

        config = load_hf_config(path)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        record = {"preset": f"hf:{os.path.basename(os.path.normpath(path))}",
                  "n_layer": text.num_hidden_layers, "d_model": text.hidden_size,
                  "n_head": text.num_attention_heads, "vocab_size": text.vocab_size}
        return cls(record, {"path": os.path.abspath(path), "config": config_key(config)})

    @classmethod
    def of_plan(cls, plan) -> "ModelSpec":
        return cls(plan.model, dict(getattr(plan, "hf", None) or {}))

    @property
    def unit_recompute(self) -> bool:
        """Whether the runtime can recompute units inside this model's blocks (hetrain's GPT)."""
        return not self.hf

    def model_config(self) -> ModelConfig:
        """hetrain's GPT config of the record; ConfigError for a transformers model or a bad record."""
        if self.hf:
            raise ConfigError("this plan is for a transformers model, not hetrain's GPT")
        try:
            cfg = ModelConfig(**self.record)
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the plan describes no valid model ({e}); re-plan") from None
        return cfg

    def key(self) -> dict:
        """What a profile entry is keyed on: the ModelConfig fields, or for a transformers model
        {'hf_config': its config without volatile entries}."""
        return {"hf_config": self.hf["config"]} if self.hf else dict(self.record)

    def label(self) -> str:
        """The model in words, for messages."""
        if self.hf:
            c = self.hf["config"]
            layers = c.get("num_hidden_layers", c.get("n_layer"))
            return f"Hugging Face model '{self.hf['path']}' ({c.get('model_type')}, {layers} layers)"
        r = self.record
        return f"model '{r.get('preset')}' (n_layer={r.get('n_layer')}, d_model={r.get('d_model')})"

    @property
    def n_blocks(self) -> int:
        return int(self.record["n_layer"])

    def describe(self, seq_len: int, micro_batch: int = 1, dtype_bytes: int = 2) -> ModelDescription:
        """Per-layer parameters, FLOPs and bytes (compute in `dtype_bytes`-byte floats; the
        cluster planners price 2). ConfigError for a model hetrain cannot describe."""
        if self.hf:
            from hetrain.model.hf import config_from_dict
            from hetrain.model.hf_describe import describe_hf

            return describe_hf(config_from_dict(self.hf["config"]), micro_batch, seq_len, dtype_bytes)
        try:
            return describe_model(self.model_config(), micro_batch, seq_len, dtype_bytes)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def describe_batch(self, batch: BatchShape) -> ModelDescription:
        return self.describe(batch.seq_len, batch.micro_batch, batch.dtype_bytes)
