"""Recompute units inside a transformer block: what each costs to drop and to recompute.

A block's forward is a chain of eight steps (hetrain.model.gpt): norm1, qkv, attn (the fused
attention kernel), proj (output projection, residual dropout and the residual add), norm2, up,
act (GELU or SwiGLU), down (down projection and residual dropout; the last residual add saves
nothing). Unit k is the output of step k, which step k+1 saves for backward; the down step's
output is saved by nobody, so there are seven units. A step may also save tensors of its own
making ("internal" bytes: normalisation statistics, attention's log-sum-exp or, with attention dropout
on CPU, its quadratic probabilities and mask, dropout masks, SwiGLU's gated half). The block input
(the residual stream) is never dropped: recomputation starts from it. With fused attention the
quadratic attention tensors are never stored at all.

Dropping unit k means steps k and k+1 run inside one torch.utils.checkpoint region; a run of
consecutive dropped units a..b-1 is one region over steps a..b (hetrain.pipeline.unit_recompute
runs it). What that frees and costs, exactly as torch's non-reentrant checkpoint behaves:
- every tensor saved by a step inside a region is dropped except the region's input, so a
  dropped unit frees its output bytes, and every step inside a region frees its internals; the
  region's input is kept (it usually is anyway, as the unit before it; with attention dropout on
  CPU the fused qkv tensor is saved by nobody, so a region starting at attn keeps it);
- recomputation reruns step k when unit k is dropped, and also the region's last step when that
  step saves internals (they are saved after it computes); a last step that saves only its input
  is skipped (torch stops the recomputation once the last saved tensor is back);
- except that a region ending at proj or down ends after the projection: that step's dropout
  and residual add run outside it, so its internals (the dropout mask) are kept and it is not
  rerun for them (recompute_plan.keeps_tail); a whole block recomputed on demand, torch's
  checkpoint of the block, frees them and reruns down for its mask.
All units of one region are recomputed together, so a run of dropped units has one place:
inside a wait ("window"), inside the next block's tensor-parallel all-reduces in the backward
("collective") or at the block's backward ("demand"). Collective regions of a stage's blocks
hide in a window of their own, per block: the block after it reduces its two input gradients
(before its up and qkv projections) for 2 all-reduces' time; what does not fit is exposed. The
stage's last block, which has no block after it, recomputes its attention side (regions ending
at proj at the latest) inside its own MLP's all-reduce (one all-reduce's time), its MLP side on
demand.

Bytes come from hetrain.model.describe's per-tensor figures (mapped to steps below); recompute
time splits the block's forward on the shared roofline by its terms (step_times_s: each matmul
step its GEMM, attn the attention kernel, the rest over the other steps by bytes touched). This
module is arithmetic over a ModelConfig: it must not build modules, touch tensors or choose
policies.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.model.describe import block_act_bytes
from hetrain.model.gpt import ModelConfig
from hetrain.plan.cluster.recompute_plan import (COLLECTIVE, DEMAND, ROW_STEPS, STEPS, UNITS, WINDOW, BlockPolicy,
                                                 keeps_tail)

_PROJ = STEPS.index("proj")


# describe.block_act_bytes key -> (step, "out" | "int" | "root"). RMSNorm's fp32 copy of its input
# is that input's bytes (exact in fp32 compute, where the copy is the input itself).
_KEY_ROLE = {
    "norm1.in": ("", "root"), "norm1.in_fp32": ("", "root"),
    "norm1.mean_rstd": ("norm1", "int"), "norm1.rstd": ("norm1", "int"), "norm1.normed_fp32": ("norm1", "int"),
    "attn.qkv_in": ("norm1", "out"), "attn.qkv": ("qkv", "out"),
    "attn.q_rope": ("attn", "int"), "attn.k_rope": ("attn", "int"), "attn.lse": ("attn", "int"),
    "attn.q_scaled": ("attn", "int"), "attn.k_scaled": ("attn", "int"), "attn.v_copy": ("attn", "int"),
    "attn.probs": ("attn", "int"), "attn.drop_mask": ("attn", "int"), "attn.probs_dropped": ("attn", "int"),
    "attn.resid_mask": ("proj", "int"),
    "norm2.in": ("proj", "out"), "norm2.in_fp32": ("proj", "out"),
    "norm2.mean_rstd": ("norm2", "int"), "norm2.rstd": ("norm2", "int"), "norm2.normed_fp32": ("norm2", "int"),
    "mlp.up_in": ("norm2", "out"), "mlp.up_out": ("up", "out"), "mlp.silu_gate": ("act", "int"),
    "mlp.down_in": ("act", "out"), "mlp.resid_mask": ("down", "int"),
    "attn.out": ("attn", "special"), "attn.proj_in": ("attn", "special"),  # see block_units
}


@dataclass(frozen=True)
class Step:
    name: str
    out_bytes: int
    """Bytes of its output that the next step saves (unit bytes); 0 for down."""
    int_bytes: int
    """Bytes it saves of its own making."""
    flops: float
    """Forward FLOPs for one micro-batch."""
    touched_bytes: float
    """Bytes its forward reads and writes (weights, inputs, outputs)."""
    in_bytes: int = 0
    """Bytes of its input: what a checkpoint region starting at this step keeps (more than the
    previous unit's bytes when nobody else saves that input: qkv with attention dropout on CPU)."""


@dataclass(frozen=True)
class BlockUnits:
    """The eight steps of one block for one micro-batch, and the block input's bytes."""

    steps: tuple[Step, ...]
    root_bytes: int
    """The block input, kept under every policy."""

    @property
    def total_bytes(self) -> int:
        return self.root_bytes + sum(s.out_bytes + s.int_bytes for s in self.steps)


def block_units(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype_bytes: int) -> BlockUnits:
    """Bytes, FLOPs and traffic of each step of a block (per device without tensor parallelism)."""
    saved = block_act_bytes(cfg, micro_batch, seq_len, dtype_bytes)
    out = dict.fromkeys(STEPS, 0)
    internal = dict.fromkeys(STEPS, 0)
    root = 0
    for key, nbytes in saved.items():
        step, role = _KEY_ROLE[key]
        if role == "special":
            continue
        if role == "root":
            root += nbytes
        elif role == "out":
            out[step] += nbytes
        else:
            internal[step] += nbytes
    if cfg.attn_dropout == 0 and cfg.pos == "learned":
        # The attention output is a view of the kernel's own saved output: one storage, freed
        # only when both attn and proj drop it, i.e. when the attn unit is dropped.
        out["attn"] += saved["attn.out"]
    elif "attn.out" in saved:  # rope: the kernel's output is internal, proj saves its copy
        internal["attn"] += saved["attn.out"]
        out["attn"] += saved["attn.proj_in"]
    else:  # attention dropout (math kernel): proj saves the output's copy
        out["attn"] += saved["attn.proj_in"]
    BT, C, F, b = micro_batch * seq_len, cfg.d_model, cfg.d_ff, dtype_bytes
    kv = cfg.n_kv_head * cfg.head_dim
    up_w = F * (2 if cfg.mlp == "swiglu" else 1)
    act = BT * C * b
    attn_flops = 2.0 * BT * seq_len * C * (2 if cfg.attn_dropout > 0 else 1)  # the math kernel skips no masked half
    attn_bytes = BT * (C + 2 * kv) * b + act + (3 * internal["attn"] if cfg.attn_dropout > 0 else 0)
    norm_flops = 8.0 * BT * C
    flops = {"norm1": norm_flops, "qkv": 2.0 * BT * C * (C + 2 * kv), "attn": attn_flops, "proj": 2.0 * BT * C * C,
             "norm2": norm_flops, "up": 2.0 * BT * C * up_w, "act": 10.0 * BT * F, "down": 2.0 * BT * F * C}
    touched = {"norm1": 2 * act, "qkv": act + C * (C + 2 * kv) * b + BT * (C + 2 * kv) * b, "attn": attn_bytes,
               "proj": 3 * act + C * C * b, "norm2": 2 * act, "up": act + (C + BT) * up_w * b,
               "act": BT * (up_w + F) * b, "down": BT * F * b + F * C * b + act}
    for step in ("proj", "down"):  # dropout reads and writes the output and writes a one-byte mask
        touched[step] += (2 * act + BT * C if cfg.dropout > 0 else 0)
    inputs = [root] + [out[s] for s in STEPS[:-1]]
    inputs[STEPS.index("attn")] = BT * (C + 2 * kv) * b  # the fused qkv storage
    steps = tuple(Step(s, out[s], internal[s], flops[s], float(touched[s]), inputs[k]) for k, s in enumerate(STEPS))
    return BlockUnits(steps, root)


GEMM_STEPS = ("qkv", "proj", "up", "down")
"""The steps that are the block's matmuls, in the order of LayerDescription.gemms."""


def step_times_s(units: BlockUnits, seconds) -> list[float]:
    """The block's forward on the shared roofline (`seconds`: predict.roofline.LayerSeconds)
    split over its steps: each matmul step its GEMM's time, attn the attention kernel's, and the
    rest (elementwise traffic and launches) over the other steps by the bytes they touch. A whole
    block recomputed on demand then costs exactly the layer's recompute_s."""
    times = [0.0] * len(STEPS)
    for name, gemm_s in zip(GEMM_STEPS, seconds.gemm_s, strict=True):
        times[STEPS.index(name)] = gemm_s
    times[STEPS.index("attn")] += seconds.attention_s
    rest = max(0.0, seconds.fwd_s - sum(seconds.gemm_s) - seconds.attention_s)
    weights = [0.0 if s.name in GEMM_STEPS else s.touched_bytes for s in units.steps]
    return [t + rest * w / sum(weights) for t, w in zip(times, weights)]


@dataclass(frozen=True)
class PolicyCost:
    """What one block's policy frees and costs, for one micro-batch."""

    freed_bytes: int
    window_freed_bytes: int
    """Of freed_bytes, what the window regions restore ahead of the backward (held until it)."""
    window_s: float
    demand_s: float
    collective_s: float = 0.0
    """Seconds of the regions placed inside the next block's all-reduces."""
    collective_freed_bytes: int = 0
    own_s: float = 0.0
    """Of collective_s, the attention side's (regions ending at proj at the latest): on a stage's
    last block they run inside its own MLP all-reduce."""
    own_freed_bytes: int = 0


def policy_cost(policy: BlockPolicy, units: BlockUnits, times_s: list[float]) -> PolicyCost:
    """Freed bytes and recompute seconds of `policy` on a block with these steps and step times."""
    freed = {WINDOW: 0, DEMAND: 0, COLLECTIVE: 0}
    cost = {WINDOW: 0.0, DEMAND: 0.0, COLLECTIVE: 0.0}
    own_s, own_freed = 0.0, 0
    steps = units.steps
    for a, b, place in policy.regions():  # steps a..b in one region, units a..b-1 dropped
        last_int = 0 if keeps_tail(a, b, place) else steps[b].int_bytes
        f = sum(steps[k].out_bytes for k in range(a, b)) + sum(steps[k].int_bytes for k in range(a, b)) + last_int
        f -= region_input_extra(steps, a)
        c = sum(times_s[k] for k in range(a, b))
        if last_int:  # the last step reruns to give back its internals
            c += times_s[b]
        freed[place] += f
        cost[place] += c
        if place == COLLECTIVE and b <= _PROJ:
            own_s, own_freed = own_s + c, own_freed + f
    return PolicyCost(sum(freed.values()), freed[WINDOW], cost[WINDOW], cost[DEMAND], cost[COLLECTIVE],
                      freed[COLLECTIVE], own_s, own_freed)


def reruns_row_parallel(first: int, last: int) -> bool:
    """Whether the region over steps first..last (at a place other than a whole block on demand)
    reruns proj or down (a row-parallel projection, with its all-reduce under tensor
    parallelism): only when it drops proj's output, since a region ending at one of them keeps
    its tail outside (keeps_tail)."""
    return any(k in ROW_STEPS for k in range(first, last))


def region_input_extra(steps: tuple[Step, ...], first: int) -> int:
    """Bytes a region starting at step `first` keeps beyond the previous unit: its input's storage,
    when the input is not otherwise saved."""
    return max(0, steps[first].in_bytes - steps[first - 1].out_bytes) if first > 0 else 0


def unit_table(units: BlockUnits, times_s: list[float]) -> list[dict]:
    """One row per unit (name, bytes it frees alone, seconds to recompute it alone), for reports."""
    rows = []
    for k, name in enumerate(UNITS):
        c = policy_cost(BlockPolicy(tuple(DEMAND if j == k else None for j in range(len(UNITS)))), units, times_s)
        rows.append({"unit": name, "bytes": c.freed_bytes, "recompute_s": c.demand_s})
    return rows


def per_device(units: BlockUnits, tp: int) -> BlockUnits:
    """A block's steps on one device of a tensor-parallel group (bytes, FLOPs and traffic / tp)."""
    if tp == 1:
        return units
    steps = tuple(Step(s.name, s.out_bytes // tp, s.int_bytes // tp, s.flops / tp, s.touched_bytes / tp,
                       s.in_bytes // tp) for s in units.steps)
    return BlockUnits(steps, units.root_bytes // tp)


def stage_steps(ctx, group, tp: int, micro_batch: int) -> tuple[BlockUnits, tuple[float, ...], float]:
    """One block's steps on a device of `group` at TP degree `tp` for one micro-batch, each step's
    recompute seconds, and the collective window: the cluster predictor's block forward time
    (hetrain.plan.cluster.cost) split over the steps (step_times_s); with tensor
    parallelism, proj and down also repeat their all-reduce, and a block's backward reduces its two
    input gradients (2 all-reduces: the window of the block before it). `ctx` is a CostContext."""
    from hetrain.plan.cluster.cost import ring_allreduce_s

    desc = ctx.desc
    units = per_device(block_units(desc.config, micro_batch, desc.seq_len, desc.compute_dtype_bytes), tp)
    kit = ctx.kit(group, tp, micro_batch)
    allreduce_s = ring_allreduce_s(kit.boundary_bytes * tp, tp, ctx.intra_path(group)) if tp > 1 else 0.0
    times = step_times_s(units, kit.block.seconds)
    for name in ("proj", "down"):
        times[STEPS.index(name)] += allreduce_s
    return units, tuple(times), 2 * allreduce_s


@dataclass(frozen=True)
class StageCost:
    """What a stage's policies free and cost for one micro-batch, all blocks, collective regions
    priced against their windows."""

    freed_bytes: int
    window_s: float
    """Recomputed ahead of the backward (in the wait for the gradient)."""
    window_freed_bytes: int
    """Restored ahead of the backward and held until it."""
    backward_s: float
    """Recomputation that lengthens the backward: on demand, and collective regions' overrun."""
    collective_s: float
    """All collective regions' seconds; collective_s - collective_hidden_s is in backward_s."""
    collective_hidden_s: float
    collective_held_bytes: int
    """Restored early and held at once, at most: when block b's MLP all-reduce restores block
    b - 1's collective regions, block b's attention side (restored in the block after it, or in
    this same window for the last block) waits for its backward too."""


def stage_cost(policies: list[BlockPolicy], units: BlockUnits, times_s, collective_window_s: float) -> StageCost:
    """The sum over a stage's blocks (in order) of what their policies free and cost."""
    freed = window_freed = held = 0
    window = backward = collective = hidden = 0.0
    before = 0  # the previous block's collective bytes, restored in this block's all-reduces
    for b, policy in enumerate(policies):
        c = policy_cost(policy, units, list(times_s))
        freed, window_freed = freed + c.freed_bytes, window_freed + c.window_freed_bytes
        window, backward, collective = window + c.window_s, backward + c.demand_s, collective + c.collective_s
        if collective_window_s <= 0:  # no tensor parallelism: their backward recomputes them
            backward += c.collective_s
            continue
        held = max(held, before + c.own_freed_bytes)
        before = c.collective_freed_bytes
        if b + 1 < len(policies):  # inside the next block's two all-reduces
            hidden_s = min(c.collective_s, collective_window_s)
        else:  # the last block: its attention side in its own MLP's all-reduce, its MLP side on demand
            hidden_s = min(c.own_s, collective_window_s / 2)
        hidden += hidden_s
        backward += c.collective_s - hidden_s
    return StageCost(freed, window, window_freed, backward, collective, hidden, held)
