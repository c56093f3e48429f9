"""Typed configuration: one dataclass per concern, TOML files, `--section.key value` overrides.

Every field carries a docstring (the string literal under it); `--help` prints those same
texts. Resolution order: dataclass defaults, then the model preset named by `model.preset`,
then the TOML file, then command-line overrides. Unknown keys and values of the wrong type
are ConfigErrors that name the nearest valid key or the expected type, raised before any
work starts. This module parses and validates; it never touches files other than the one it
is asked to read or write.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from hetrain.data import DataConfig
from hetrain.errors import ConfigError
from hetrain.files import write_atomic
from hetrain.model.gpt import ModelConfig
from hetrain.model.presets import get_preset


@dataclass
class RunConfig:
    """Where the run lives and how it starts."""

    dir: str = "runs/default"
    """Run directory: config.toml, metrics.jsonl, TensorBoard events, checkpoints/ and exports."""
    seed: int = 1337
    """Seed for weights, data order and dropout-free training; same seed, same run."""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu' or 'cuda'."""
    resume: str = ""
    """'' starts a new run (refused if run.dir already holds checkpoints); 'auto' resumes the latest checkpoint in run.dir; or a checkpoint directory path."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 uses every core of this machine."""
    dist_timeout_s: float = 300.0
    """Under torchrun: how long any rank waits for the others in a collective before the job ends with a message naming the ranks that did not answer."""
    cpu_overlap_grad_reduce: bool = False
    """Cluster runs: also overlap the replicas' gradient all-reduce with the backward on CPU processes (gloo), where the planner prices it after the backward because the reduction runs on the cores the backward uses (measured slower on a 2-core machine: bench/bench_pipeline.py)."""
    emulate_link_gbytes_per_s: float = 0.0
    """Cluster runs, for benchmarks: hold every pipeline send for its bytes at this bandwidth (GB/s) before sending, as if the stages were joined by a link that slow (the cluster predictor prices a send the same way: the sender is busy for it); 0 sends at the real speed."""
    emulate_tp_link_gbytes_per_s: float = 0.0
    """Cluster runs, for benchmarks: make every tensor-parallel all-reduce (forward and backward) last at least as long as a ring all-reduce of its bytes at this bandwidth (GB/s) with no latency, 2 (tp - 1) / tp x bytes / bandwidth, as the cluster predictor prices it, sleeping for what remains after the real one; 0 reduces at the real speed."""
    recompute_full_rerun: bool = False
    """Cluster runs of hetrain's own models, as a baseline to compare against: a block or unit the plan recomputes on demand reruns its whole forward, tensor-parallel all-reduces included (torch.utils.checkpoint with early_stop=False), as Megatron-LM's full recomputation and other reentrant checkpoints do, instead of stopping once its last saved tensor is back (the default, which the planner prices). Regions the plan places in waits or all-reduces keep the early stop (they must not rerun an all-reduce), so with unit policies the rerun is partial."""


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 600
    """Optimizer steps to run (the total, counting steps done before a resume)."""
    micro_batch: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seq_len: int = 128
    """Tokens per sequence (at most model.max_seq_len); when not given, 128 or the model's max_seq_len if that is smaller."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Linear warmup steps from 0 to train.lr."""
    decay_steps: int = 0
    """Step at which the cosine decay reaches train.min_lr (then stays there); 0 means train.steps. Set it when a run will be extended: a resume with more train.steps then keeps the schedule the first steps ran under."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to matrices only (not norms, biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    dtype: str = "fp32"
    """Compute dtype: 'fp32' or 'bf16' (autocast, fp32 master weights)."""
    eval_every: int = 100
    """Validation loss every N steps (and at the end); 0 disables."""
    eval_batches: int = 8
    """Micro-batches in each validation pass (always the same batches)."""
    log_every: int = 10
    """Print and record metrics every N steps."""
    ckpt_every: int = 200
    """Checkpoint every N steps (and at the end); 0 saves only at the end."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept in run.dir/checkpoints; older ones are deleted; 0 keeps all."""


@dataclass
class LogConfig:
    """What a run reports."""

    progress: bool = True
    """Show a progress bar with ETA (on stderr)."""
    tensorboard: bool = True
    """Write TensorBoard events to run.dir/tb."""
    peak_flops: float = 0.0
    """Device peak FLOP/s for MFU; 0 takes the catalog figure on a GPU, or measures a matmul on CPU."""
    trace: bool = False
    """Record what really ran (per block forward/backward, optimizer, data) for log.trace_steps steps after the first, into run.dir/trace.json (Chrome/Perfetto) and trace_timeline.png. `--trace` is short for `--log.trace true`."""
    trace_steps: int = 3
    """How many steps --trace records (starting at the second step, after warm-up)."""


@dataclass
class HardwareConfig:
    """What the performance predictor assumes about the machine."""

    device_kind: str = ""
    """Catalog device kind to predict for (e.g. 'H100-SXM'); '' means this machine, from its profile."""
    profile_dir: str = "~/.cache/hetrain/profiles"
    """Where `hetrain profile` caches measurements, one file per machine."""


@dataclass
class MemoryConfig:
    """Memory budgets the offload planner must respect."""

    device_budget: str = "auto"
    """Device memory the plan may use: a size ('24GiB', '512MiB', a byte count); a share of what plain training would hold for this model and batch ('60%'); 'none' for no limit (plain training); 'auto' for 90% of the GPU's memory on a GPU (plain training when the model fits), and 50% of plain training's need on a CPU, which has no device memory to detect, so that the offload engine runs there too."""
    host_budget: str = ""
    """Host RAM the plan may pin for weights and optimizer state; '' means 80% of this machine's RAM."""


@dataclass
class PlanConfig:
    """Which plan runs."""

    file: str = ""
    """A plan.json (from `hetrain plan`) to run as is, without re-planning; '' plans automatically."""
    cluster: str = ""
    """A cluster file (TOML, see configs/clusters/mixed.toml) for `hetrain plan`: plan data/tensor/pipeline parallelism over it. `--cluster FILE` is short for this."""
    global_batch: int = 1024
    """Sequences per optimizer step across the whole cluster (cluster planning)."""
    tp: int = 0
    """Cluster planning: pin the tensor-parallel degree of every group (0: the search chooses)."""
    pp: int = 0
    """Cluster planning: pin the pipeline stages of every pipeline (0: the search chooses)."""
    dp: int = 0
    """Cluster planning: pin the data-parallel replicas of every pipeline (0: the search chooses)."""
    micro_batch: int = 0
    """Cluster planning: pin the micro-batch size (0: the search chooses)."""
    virtual_stages: int = 1
    """Cluster planning: model chunks per pipeline stage; more than 1 runs interleaved 1F1B."""
    dtype: str = "bf16"
    """Cluster planning: the compute dtype the plan is priced for: 'bf16' (Megatron's mixed precision: bf16 weights, activations and stage boundaries, fp32 masters and gradients) or 'fp32' (what a cluster run computes in unless --train.dtype bf16; see docs/pipeline.md)."""
    mixed_tp: bool = False
    """Cluster planning: let the groups of one pipeline take different tensor-parallel degrees. The pipeline runtime cannot run such a plan yet (it pairs neighbouring stages TP rank by TP rank): true plans for prediction only, and the report says so."""
    distributed_optimizer: str = "auto"
    """Cluster planning, ZeRO-1 (each of a stage's replicas updates a share of its parameters and alone holds their AdamW moments, and in bf16 their fp32 masters; with one pipeline gradients are reduced to the replica that updates them; it then broadcasts the updated weights): 'auto' plans with and without it and keeps the faster plan, 'true' or 'false' fixes it."""
    overlap_grad_reduce: bool = True
    """Cluster planning: each block's gradients are all-reduced across replicas inside the backward, as soon as they are final (false: after the backward), priced and run so."""
    recompute: str = "heu"
    """Cluster planning, stages that must recompute: 'heu' (which tensors of each block to drop, recomputed inside the waits for gradients where they fit, with stages balanced for it), 'opt' (the same by an exact MILP; small models only) or 'whole' (whole blocks, on demand)."""


@dataclass
class HFConfig:
    """A Hugging Face transformers causal LM instead of a hetrain preset (needs `pip install 'hetrain[hf]'`)."""

    path: str = ""
    """Local folder with config.json (weights loaded if present), or a config.json file; '' uses the hetrain model."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    hf: HFConfig = field(default_factory=HFConfig)


# --- field docs and types -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s, cls in _sections().items() for k in _field_types(cls)]


def _nearest(key: str) -> str:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    return f" (did you mean '{near[0]}'?)" if near else " (run with --help for the list of keys)"


def _coerce(key: str, typ: type, value):
    """Convert a TOML value or a command-line string to the field's type, or say why not."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        try:
            if typ is bool:
                low = text.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            if typ is int:
                return int(text.replace("_", ""))
            if typ is float:
                return float(text)
        except ValueError:
            pass
        raise ConfigError(f"{key} expects {_type_name(typ)}, got '{value}'")
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is bool and not isinstance(value, bool) or typ is not bool and isinstance(value, bool):
        raise ConfigError(f"{key} expects {_type_name(typ)}, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"{key} expects {_type_name(typ)}, got {value!r}")
    return value


def _type_name(typ: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(typ, typ.__name__)


# --- loading ------------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.steps', '10', '--run.dir=x'] -> {'train.steps': '10', 'run.dir': 'x'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key value (see --help)")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value, e.g. {arg} VALUE")
            key, value = arg[2:], args[i + 1]
            i += 1
        out[key] = value
        i += 1
    return out


def _flatten_toml(data: dict, source: str) -> dict[str, object]:
    flat = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: top-level key '{section}' must be a [section] table{_nearest(section)}")
        for key, value in table.items():
            flat[f"{section}.{key}"] = value
    return flat


def read_toml(path: str | os.PathLike) -> dict[str, object]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist; pass an existing TOML file to --config")
    try:
        return _flatten_toml(tomllib.loads(p.read_text()), str(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None


def build_config(values: dict[str, object]) -> Config:
    """A Config from flat 'section.key' values (defaults for the rest), validated."""
    sections = _sections()
    typed: dict[str, dict[str, object]] = {s: {} for s in sections}
    for key, value in values.items():
        section, _, name = key.partition(".")
        types = _field_types(sections[section]) if section in sections else {}
        if name not in types:
            raise ConfigError(f"unknown config key '{key}'{_nearest(key)}")
        typed[section][name] = _coerce(key, types[name], value)

    model_values = typed.pop("model")
    preset = model_values.get("preset", ModelConfig.preset)
    try:
        model = dataclasses.replace(get_preset(preset), **model_values)
        model.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if "seq_len" not in typed["train"] and TrainConfig.seq_len > model.max_seq_len:
        typed["train"]["seq_len"] = model.max_seq_len  # the default, fitted to a short-context model
    cfg = Config(model=model, **{s: sections[s](**v) for s, v in typed.items()})
    validate(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | dict[str, str] | None = None) -> Config:
    values: dict[str, object] = dict(read_toml(path)) if path else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    return build_config(values)


def validate(cfg: Config) -> None:
    """Cross-field checks that a single type cannot express."""
    t = cfg.train
    for key in ("steps", "micro_batch", "grad_accum", "seq_len", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {getattr(t, key)}")
    for key, meaning in (("ckpt_every", "0 saves only at the end"), ("keep_checkpoints", "0 keeps all"),
                         ("eval_every", "0 disables evaluation"), ("warmup_steps", "0 starts at train.lr"),
                         ("decay_steps", "0 decays over train.steps")):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key} must be 0 or more ({meaning}), got {getattr(t, key)}")
    for key, value in (("train.eval_batches", t.eval_batches), ("log.trace_steps", cfg.log.trace_steps)):
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {t.lr}")
    if t.min_lr < 0:
        raise ConfigError(f"train.min_lr must be 0 or more, got {t.min_lr}")
    if t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be 0 (off) or positive, got {t.grad_clip}")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1) or t.weight_decay < 0:
        raise ConfigError(f"AdamW needs 0 <= train.beta1, train.beta2 < 1 and train.weight_decay >= 0; got "
                          f"{t.beta1}, {t.beta2}, {t.weight_decay}")
    if cfg.run.emulate_link_gbytes_per_s < 0:
        raise ConfigError(f"run.emulate_link_gbytes_per_s must be 0 (off) or positive, got "
                          f"{cfg.run.emulate_link_gbytes_per_s}")
    if cfg.run.emulate_tp_link_gbytes_per_s < 0:
        raise ConfigError(f"run.emulate_tp_link_gbytes_per_s must be 0 (off) or positive, got "
                          f"{cfg.run.emulate_tp_link_gbytes_per_s}")
    if cfg.run.recompute_full_rerun and not cfg.plan.file:  # transformers plans: cluster_launch.prepare
        raise ConfigError("run.recompute_full_rerun applies to cluster runs (--plan.file) of hetrain's own models; "
                          "drop --run.recompute_full_rerun")
    if cfg.run.dist_timeout_s <= 0:
        raise ConfigError(f"run.dist_timeout_s must be positive, got {cfg.run.dist_timeout_s}")
    if t.seq_len > cfg.model.max_seq_len and not cfg.hf.path:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
                          f"lower --train.seq_len or raise --model.max_seq_len")
    if t.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"train.dtype must be 'fp32' or 'bf16', got '{t.dtype}'")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be 'auto', 'cpu' or 'cuda', got '{cfg.run.device}'")
    if cfg.hardware.device_kind:
        from hetrain.hardware.catalog import get_kind

        get_kind(cfg.hardware.device_kind)  # ConfigError naming the nearest kinds
    parse_device_budget(cfg.memory.device_budget)
    parse_bytes("memory.host_budget", cfg.memory.host_budget)
    if cfg.plan.cluster and not Path(cfg.plan.cluster).expanduser().is_file():
        raise ConfigError(f"cluster file '{cfg.plan.cluster}' does not exist; pass an existing TOML file to --cluster")
    if cfg.plan.global_batch < 1:
        raise ConfigError(f"plan.global_batch must be at least 1, got {cfg.plan.global_batch}")
    for key in ("tp", "pp", "dp", "micro_batch"):
        if getattr(cfg.plan, key) < 0:
            raise ConfigError(f"plan.{key} must be 0 (the search chooses) or a positive degree, got {getattr(cfg.plan, key)}")
    if cfg.plan.virtual_stages < 1:
        raise ConfigError(f"plan.virtual_stages must be at least 1, got {cfg.plan.virtual_stages}")
    if cfg.plan.dtype not in ("fp32", "bf16"):
        raise ConfigError(f"plan.dtype must be 'fp32' or 'bf16', got '{cfg.plan.dtype}'")
    if cfg.plan.distributed_optimizer not in ("auto", "true", "false"):
        raise ConfigError(f"plan.distributed_optimizer must be 'auto', 'true' or 'false', got "
                          f"'{cfg.plan.distributed_optimizer}'")
    if cfg.plan.recompute not in ("heu", "opt", "whole"):
        raise ConfigError(f"plan.recompute must be 'heu', 'opt' or 'whole', got '{cfg.plan.recompute}'")
    if not 0 <= cfg.model.dropout < 1:
        raise ConfigError(f"model.dropout must be in [0, 1), got {cfg.model.dropout}")
    if cfg.plan.file and not Path(cfg.plan.file).expanduser().is_file():
        raise ConfigError(f"plan file '{cfg.plan.file}' does not exist; make one with `hetrain plan` or drop --plan.file")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}; lower --train.min_lr")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(key: str, text: str) -> int | None:
    """'24GiB' -> 25769803776; '' -> None (no explicit budget). ConfigError naming `key` otherwise."""
    norm = text.strip().lower().replace("_", "").replace(" ", "")
    if not norm:
        return None
    number = norm.rstrip("kmgtib")
    unit = norm[len(number):]
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ConfigError(f"{key} expects a size such as '24GiB', '512MiB' or a byte count, got '{text}'") from None
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got '{text}'")
    return int(value)


def parse_device_budget(text: str) -> tuple[str, float]:
    """memory.device_budget: ('auto', 0), ('none', 0) for 'none' or '', ('share', f) for 'N%'
    (N% of what plain training would hold), ('bytes', n) for a size. ConfigError otherwise."""
    norm = text.strip().lower()
    if norm in ("auto", "none", ""):
        return ("none" if norm in ("none", "") else "auto"), 0
    if norm.endswith("%"):
        try:
            share = float(norm[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ConfigError(f"memory.device_budget as a share of plain training's need must be in (0%, 100%], "
                              f"got '{text}'")
        return "share", share
    try:
        return "bytes", parse_bytes("memory.device_budget", text)
    except ConfigError:
        raise ConfigError(f"memory.device_budget expects 'auto', 'none', a share such as '60%', or a size such as "
                          f"'24GiB' or '512MiB', got '{text}'") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as TOML (temporary name, then rename)."""
    write_atomic(path, tomli_w.dumps(to_dict(cfg)))


def format_config(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg)).rstrip()


def format_help() -> str:
    """Every key with its type, default and docstring: what `--help` prints."""
    lines = []
    defaults = Config()
    for section, cls in _sections().items():
        # A dataclass without a docstring gets its signature as __doc__: not a heading.
        doc = cls.__dict__.get("__doc__") or ""
        heading = "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc).splitlines()[0]
        lines.append(f"[{section}]  {heading}".rstrip())
        docs = field_docs(cls)
        for name, typ in _field_types(cls).items():
            default = getattr(getattr(defaults, section), name)
            lines.append(f"  --{section}.{name} {_type_name(typ).split()[-1].upper()} (default: {default!r})")
            if name in docs:
                lines.extend("      " + ln for ln in textwrap.wrap(docs[name], 88))
        lines.append("")
    return "\n".join(lines)
