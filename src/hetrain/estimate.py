"""`hetrain estimate`: memory and step-time breakdown of plain training, without training.

Reads the analytic model description (works for a 175B preset on a laptop) and reports what
plain data-resident training needs per device: parameters, gradients, Adam state and saved
activations, by layer kind, with FLOPs per step. It only computes and formats; it builds no
model and allocates no tensors.
"""

from __future__ import annotations

from hetrain.model.describe import ModelDescription
from hetrain.model.spec import BatchShape, ModelSpec
from hetrain.predict.state_bytes import ADAM_MOMENT_BYTES_PER_PARAM, GRAD_BYTES_PER_PARAM, MASTER_BYTES_PER_PARAM
from hetrain.units import fmt_bytes


def memory_breakdown(desc: ModelDescription) -> dict[str, int]:
    """Bytes held at the peak of a plain training step (steady state, from step 2 on)."""
    params = desc.total_params
    out = {
        "parameters (fp32)": MASTER_BYTES_PER_PARAM * params,
        "gradients (fp32)": GRAD_BYTES_PER_PARAM * params,
        "adam state (fp32 m, v)": ADAM_MOMENT_BYTES_PER_PARAM * params,
    }
    if desc.compute_dtype_bytes < MASTER_BYTES_PER_PARAM:  # bf16: the step's copy (hetrain.precision)
        out["weights, bf16 copy (a step)"] = desc.compute_dtype_bytes * params
    out["activations (one micro-batch)"] = sum(layer.act_bytes_total for layer in desc.layers())
    return out


def estimate_report(spec: ModelSpec, t: BatchShape) -> str:
    """The report of `hetrain estimate` for `spec`'s model (hetrain's preset, or a transformers
    model) at the batch shape `t`."""
    desc = spec.describe_batch(t)
    tokens_per_step = t.micro_batch * t.seq_len * t.grad_accum
    lines = [
        f"{spec.label()}: {desc.total_params / 1e6:,.1f}M parameters, {len(desc.blocks)} blocks; "
        f"micro-batch {t.micro_batch} x {t.seq_len} tokens, {t.grad_accum} micro-batches/step, {t.dtype}",
        "",
        f"{'layer':<12}{'params':>14}{'fwd GFLOP/mb':>16}{'saved act/mb':>16}",
    ]
    block = desc.blocks[0]
    rows = [(desc.embedding, 1), (block, len(desc.blocks)), (desc.head, 1)]
    for layer, count in rows:
        name = "block x%d" % count if layer is block else layer.name
        lines.append(f"{name:<12}{layer.params * count:>14,}"
                     f"{layer.fwd_flops_per_token * desc.tokens_per_microbatch * count / 1e9:>16,.2f}"
                     f"{fmt_bytes(layer.act_bytes_total * count):>16}")
    lines += ["", "largest saved tensors of one block (per micro-batch):"]
    for name, nbytes in sorted(block.act_bytes.items(), key=lambda kv: -kv[1])[:6]:
        lines.append(f"  {name:<22}{fmt_bytes(nbytes):>12}")
    mem = memory_breakdown(desc)
    lines += ["", "peak device memory of plain training (everything resident):"]
    lines += [f"  {k:<32}{fmt_bytes(v):>12}" for k, v in mem.items()]
    lines.append(f"  {'total':<32}{fmt_bytes(sum(mem.values())):>12}")
    flops = desc.train_flops_per_token() * tokens_per_step
    lines += ["", f"training FLOPs per step: {flops:.3e} ({desc.train_flops_per_token():.3e} per token)"]
    return "\n".join(lines)
