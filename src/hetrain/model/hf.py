"""Hugging Face causal language models behind the same interface as hetrain's own GPT.

`load_hf_model` builds a transformers `AutoModelForCausalLM` from a local folder (loading
its weights when the folder has them) or from a config.json alone (random weights), and
wraps it in `HFCausalLM`, whose `forward(idx, targets=None)`, `blocks`, `num_params()` and
`train_flops_per_token(seq_len)` follow the conventions of `hetrain.model.gpt.GPT`, and which
implements the block interface of hetrain.model.stack (embedding, blocks, head driven one at
a time), so the trainer, the planners, the profiler and the offload engine treat it like a
GPT. The embedding stage is the HF model's own forward, stopped as it calls the first
decoder layer: what it passes that layer (rotary cos/sin, mask, position ids) is what every
block gets, so no architecture's masks or rotary tables are re-implemented here (hf_io.py
writes models back and reads tokenizers). This file must never download anything (every transformers call is
local-only and remote code is not trusted), must import transformers only inside the
functions that need it (it is the optional extra `hf`), must not change the wrapped model's
layers or weights, and must not import hetrain.train.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hetrain.errors import ConfigError

INSTALL_HINT = "pip install 'hetrain[hf]'"
# File names whose presence in the folder means "load these weights" (sharded checkpoints
# carry an index next to shards that match the same patterns).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Config entries that say where or by what a config was written, not what the model is.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype")


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(f"--hf.path needs the transformers library, which is not installed: {INSTALL_HINT}") from exc
    return transformers


@contextlib.contextmanager
def quiet_progress(transformers):
    """transformers' per-file progress bars off (hetrain prints its own lines), then as before."""
    logging = transformers.utils.logging
    was = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            logging.enable_progress_bar()


def _dtype_kwargs(transformers, dtype: torch.dtype) -> dict:
    # transformers 4.56 renamed `torch_dtype` to `dtype`; the extra allows both sides.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def find_blocks(module: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack of a transformers model, found without knowing its class.

    Rule: among all nn.ModuleLists in the module tree that are non-empty and whose children
    all have exactly the same class, drop those nested inside another such list (e.g. the
    experts of a mixture-of-experts layer), then take the one with the most children; a tie
    goes to the first in registration order. This finds `model.layers` (Llama, Mistral,
    Qwen2), `transformer.h` (GPT-2) and `gpt_neox.layers` (GPT-NeoX). Returns the dotted
    path and the list; raises ConfigError when there is none.
    """
    homogeneous = [
        (name, mod) for name, mod in module.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(child) for child in mod}) == 1
    ]
    outermost = [
        (name, mod) for name, mod in homogeneous
        if not any(name.startswith(other + ".") for other, _ in homogeneous)
    ]
    if not outermost:
        raise ConfigError(f"found no stack of identical decoder layers in {type(module).__name__}; "
                          "--hf.path must point at a decoder-only transformer")
    # max() keeps the first of equally long lists, i.e. registration order breaks ties.
    return max(outermost, key=lambda item: len(item[1]))


class _Captured(Exception):
    """Raised by the first decoder layer's pre-hook to end the HF forward once the embedding
    stage has computed that layer's inputs."""


class HFCausalLM(nn.Module):
    """A transformers causal LM with GPT's contract: token ids (B, T) -> logits (B, T, vocab),
    or the mean cross-entropy when targets (already shifted: targets[t] follows idx[t]) are given.

    The HF model is the only registered child (`hf_model`), so state_dict keys are the HF
    model's own keys under `hf_model.`. `blocks` is a property returning the live decoder-layer
    ModuleList inside it (not a second registration, which would duplicate every block in
    state_dict). `forward` runs the HF model's own forward; the block interface
    (hetrain.model.stack) runs it in stages: `embed_inputs` is the HF forward up to the first
    decoder layer, `block_forward` calls one layer with the arguments that forward passed it,
    `head` is the modules registered after the layer list in its parent (the final norm; ones
    without parameters, like a rotary table, are skipped) and the output embeddings.
    `check_stages` verifies that this decomposition computes the HF forward.
    """

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf_model = hf_model
        self.hf_config = hf_model.config
        self.blocks_path, blocks = find_blocks(hf_model)
        parent_path, _, list_name = self.blocks_path.rpartition(".")
        parent = hf_model.get_submodule(parent_path)
        names = list(parent._modules)
        after = names[names.index(list_name) + 1:]
        prefix = f"{parent_path}." if parent_path else ""
        self._tail = [prefix + n for n in after if any(True for _ in parent._modules[n].parameters())]
        output = hf_model.get_output_embeddings()
        self._output_name = next(n for n, m in hf_model.named_modules() if m is output)
        self._head_prefixes = tuple(f"hf_model.{n}" for n in (*self._tail, self._output_name))
        self._n_blocks = len(blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hf_model.get_submodule(self.blocks_path)

    @property
    def text_config(self):
        """The language-model part of the config (the config itself for plain causal LMs)."""
        get_text_config = getattr(self.hf_config, "get_text_config", None)
        return get_text_config() if get_text_config is not None else self.hf_config

    @property
    def vocab_size(self) -> int:
        return self.hf_model.get_output_embeddings().weight.shape[0]

    @property
    def max_seq_len(self) -> int | None:
        """Longest sequence the config declares (None when it declares none)."""
        return getattr(self.text_config, "max_position_embeddings", None)

    def _check_len(self, idx: torch.Tensor) -> None:
        if self.max_seq_len is not None and idx.shape[1] > self.max_seq_len:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the HF config's "
                             f"max_position_embeddings={self.max_seq_len}")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        self._check_len(idx)
        # No labels: the loss is computed below exactly as GPT computes it, never with HF's
        # internal shift. use_cache=False: training needs no KV cache, which would only hold
        # every layer's keys and values until the step ends.
        logits = self.hf_model(input_ids=idx, use_cache=False).logits  # (B, T, vocab)
        return self._loss(logits, targets)

    @staticmethod
    def _loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    # --- the block interface (hetrain.model.stack) ---------------------------------------
    def embed_inputs(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[tuple, dict]]:
        """The HF forward up to its first decoder layer: that layer's hidden-states input
        (B, T, C) and, as extras, the rest of what it was called with ((args, kwargs): rotary
        cos/sin, attention mask or None, position ids, use_cache=False, ...)."""
        self._check_len(idx)
        captured = {}

        def capture(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Captured

        handle = self.blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.hf_model(input_ids=idx, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"{type(self.hf_model).__name__}'s forward never called its first decoder layer")
        args = captured["args"]
        if args:
            return args[0], (args[1:], captured["kwargs"])
        kwargs = dict(captured["kwargs"])
        return kwargs.pop("hidden_states"), ((), kwargs)

    def block_forward(self, block: nn.Module, h: torch.Tensor, extras: tuple[tuple, dict]) -> torch.Tensor:
        args, kwargs = extras
        out = block(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples

    def head(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        for name in self._tail:  # the final norm
            h = self.hf_model.get_submodule(name)(h)
        return self._loss(self.hf_model.get_submodule(self._output_name)(h), targets)

    def part_of(self, module_name: str) -> int:
        """0 for the embedding stage, i + 1 for a module inside block i, len(blocks) + 1 for
        the final norm and the output embeddings (a tied matrix is owned by the embedding,
        which holds it first)."""
        inside = f"hf_model.{self.blocks_path}."
        if module_name.startswith(inside):
            return int(module_name[len(inside):].split(".")[0]) + 1
        if any(module_name == p or module_name.startswith(p + ".") for p in self._head_prefixes):
            return self._n_blocks + 1
        return 0

    def describe(self, micro_batch: int, seq_len: int, compute_dtype_bytes: int = 2):
        """hetrain.model.hf_describe.describe_hf of this model's config."""
        from hetrain.model.hf_describe import describe_hf

        return describe_hf(self.hf_config, micro_batch, seq_len, compute_dtype_bytes)

    @torch.no_grad()
    def check_stages(self) -> None:
        """ConfigError unless the staged forward (embed_inputs, block_forward, head) gives the
        HF forward's logits, every decoder layer gets the same extra inputs, and every module
        runs in the stage `part_of` gives it (the offload engine makes a layer's weights
        available only during its own stage). Runs two tokens in eval mode."""

        was_training = self.training
        self.eval()
        idx = torch.zeros(1, 2, dtype=torch.long, device=next(self.parameters()).device)
        idx[0, 1] = min(1, self.vocab_size - 1)
        stage, seen, calls, handles = [0], {}, [], []
        try:
            for name, module in self.named_modules():
                if any(True for _ in module.parameters(recurse=False)):
                    handles.append(module.register_forward_pre_hook(
                        lambda m, a, name=name: seen.setdefault(name, set()).add(stage[0])))
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_pre_hook(
                    lambda m, a, k, i=i: calls.append((i, a[1:], k)), with_kwargs=True))
            expected = self.hf_model(input_ids=idx, use_cache=False).logits
            seen.clear()
            h, extras = self.embed_inputs(idx)
            for i, block in enumerate(self.blocks):
                stage[0] = i + 1
                h = self.block_forward(block, h, extras)
            stage[0] = len(self.blocks) + 1
            got = self.head(h, None)
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
        name = type(self.hf_model).__name__
        first = calls[0][1:]
        for i, *rest in calls[1:len(self.blocks)]:
            if not _same_objects(tuple(rest), first):
                raise ConfigError(f"{name}'s decoder layers get different inputs (layer {i} is not called like "
                                  f"layer 0, e.g. mixed sliding-window and full attention); hetrain's offload plans "
                                  f"need identical blocks: train it plainly (--memory.device_budget none)")
        if got.shape != expected.shape or not torch.equal(got.float(), expected.float()):  # the same ops
            raise ConfigError(f"{name}'s forward does more than its embedding, decoder layers, final norm and output "
                              f"embeddings (e.g. scaled or capped logits), so hetrain cannot run it layer by layer: "
                              f"train it plainly (--memory.device_budget none)")
        for module_name, stages in seen.items():
            if stages != {self.part_of(module_name)}:
                raise ConfigError(f"{name}'s module '{module_name}' runs in layer(s) {sorted(stages)} but holds "
                                  f"weights of layer {self.part_of(module_name)}, so hetrain cannot run it layer by "
                                  f"layer: train it plainly (--memory.device_budget none)")

    def num_params(self) -> int:
        """Unique parameters (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())

    def train_flops_per_token(self, seq_len: int) -> float:
        """Useful training FLOPs per token (forward + backward, no recomputation).

        Same conventions as hetrain.model.describe: a multiply-add is 2 FLOPs, backward is
        twice the forward. Matmul weights are the parameters of two or more dimensions
        inside the blocks (Linear and GPT-2 Conv1D weights; biases and norms are not
        counted), plus the output projection (vocab x hidden, counted even when tied to the
        input embedding, because its matmul runs; the embedding lookup is free). Causal
        attention costs 2*T*(n_head*head_dim) forward per layer per token. Dense models
        only: every expert of a mixture-of-experts layer would be counted, and sliding-window
        attention is charged as full causal attention.
        """
        blocks = self.blocks
        matmul = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
        matmul += self.hf_model.get_output_embeddings().weight.numel()
        cfg = self.text_config
        n_head = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        attn_fwd = 2.0 * seq_len * n_head * head_dim * len(blocks)
        return 3 * (2.0 * matmul + attn_fwd)


def _same_objects(a, b) -> bool:
    """Whether two argument structures hold the same tensors (by identity) and equal constants."""
    from torch.utils._pytree import tree_flatten

    (la, sa), (lb, sb) = tree_flatten(a), tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    return all(x is y if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x == y
               for x, y in zip(la, lb))


def _check_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--hf.path {path} does not exist; give a folder with config.json or a config.json file")
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"--hf.path {path} has no config.json; give a Hugging Face model folder or a config.json file")
    return p


def load_hf_config(path: str):
    """The transformers config at `path` (a folder with config.json, or the file), locally;
    ConfigError (naming --hf.path) when it is missing or transformers cannot read it."""
    p = _check_path(path)
    transformers = _import_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf.path {path}: transformers cannot build a causal LM from it: {exc}") from exc


def config_key(config) -> dict:
    """What identifies a model's architecture and shape in a profile or a plan: the config as
    JSON-ready data, without the entries that say where or by which version it was written."""
    doc = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS}
    return json.loads(json.dumps(doc, sort_keys=True, default=str))


def config_from_dict(doc: dict):
    """The transformers config whose to_dict() (or config_key) `doc` is."""
    doc = dict(doc)
    return _import_transformers().AutoConfig.for_model(doc.pop("model_type"), **doc)


def build_hf_model(config, device: torch.device | None = None, n_layers: int | None = None,
                   dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """A causal LM of `config` (a transformers config or its to_dict()) with transformers' random
    init from torch's global generator, on `device` (the meta device builds without memory);
    `n_layers` overrides the number of decoder layers (the profiler and the description build
    one block: the blocks are identical). In training mode."""
    transformers = _import_transformers()
    if isinstance(config, dict):
        config = config_from_dict(config)
    else:
        config = config.__class__.from_dict(config.to_dict())  # a copy: the caller's stays as it was
    if n_layers is not None:
        config.num_hidden_layers = n_layers
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:n_layers]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        hf_model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False,
                                                                  **_dtype_kwargs(transformers, dtype))
    return HFCausalLM(hf_model).train()


def load_hf_model(path: str, dtype: torch.dtype = torch.float32) -> HFCausalLM:
    """Build the causal LM described by `path`, without any network access.

    `path` is a folder with config.json, or a config.json file. A folder that also holds
    weight files (*.safetensors or pytorch_model*.bin) is loaded with those weights;
    otherwise the model is built from the config with random weights from transformers' own
    init, drawn from torch's global generator, so the caller's torch.manual_seed makes it
    reproducible. Parameters are in `dtype`; the model is returned in training mode, like a
    freshly built GPT. Raises ConfigError (naming --hf.path) for a missing path, a folder
    without config.json, a config transformers cannot build, or transformers not installed.
    """
    p = _check_path(path)
    config = load_hf_config(path)
    transformers = _import_transformers()
    has_weights = p.is_dir() and any(f for pattern in WEIGHT_PATTERNS for f in p.glob(pattern))
    try:
        if has_weights:
            with quiet_progress(transformers):
                hf_model = transformers.AutoModelForCausalLM.from_pretrained(
                    str(p), config=config, local_files_only=True, trust_remote_code=False,
                    **_dtype_kwargs(transformers, dtype))
            return HFCausalLM(hf_model).train()
        return build_hf_model(config, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--hf.path {path}: transformers cannot build a causal LM from it: {exc}") from exc
