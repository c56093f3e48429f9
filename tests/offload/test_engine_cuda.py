"""The offload engine on a CUDA device: the paths the CPU tests cannot reach (copy streams,
events, pinned host memory) and the real allocator's peak against the plan's budget.

Skipped without a GPU (`pytest -m gpu` selects them). The CPU tests hold every plan to plain
PyTorch to 1e-6; here the reference runs on the same GPU with TF32 off, so the remaining
difference is the order of floating-point reductions in cuBLAS for the flat layouts.
"""

import dataclasses

import pytest
import torch

from hetrain.config import load_config
from hetrain.model.describe import block_act_bytes
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.offload import OptimConfig, apply_plan
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.train.offload_planning import default_cost, plain_peak_for, plan_offload_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("no_tf32")]

CFG = dataclasses.replace(get_preset("tiny"), n_layer=4)
STEPS, MICRO, SEQ = 6, 4, 32
OPTIM = OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.95)


def batches(steps=STEPS, accum=2, vocab=256):
    g = torch.Generator().manual_seed(1)
    return [[(torch.randint(0, vocab, (MICRO, SEQ), generator=g), torch.randint(0, vocab, (MICRO, SEQ), generator=g))
             for _ in range(accum)] for _ in range(steps)]


def plain_run(data, lr=1e-3, clip=1.0):
    torch.manual_seed(0)
    model = GPT(CFG).cuda()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(OPTIM.beta1, OPTIM.beta2),
                            fused=True)
    losses = []
    for step in data:
        total = 0.0
        for x, y in step:
            loss = model(x.cuda(), y.cuda()) / len(step)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().cpu() for k, v in model.state_dict().items()}


def engine_run(plan, data, lr=1e-3, clip=1.0):
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), plan, OPTIM, "cuda")
    try:
        losses = [engine.train_step(step, lr, clip).loss for step in data]
        state = {k: v.detach().cpu().clone() for k, v in engine.state_dict()["model"].items()}
        return losses, state
    finally:
        engine.close()


@pytest.mark.parametrize("shape", [(0, 0, 0), (2, 2, 2), (4, 4, 4), (1, 3, 2)])
@pytest.mark.parametrize("overlap", [True, False])
def test_plans_on_cuda_train_like_plain_pytorch_on_cuda(shape, overlap):
    data = batches()
    ref_losses, ref_state = plain_run(data)
    losses, state = engine_run(OffloadPlan.prefix_suffix(4, *shape, overlap=overlap), data)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_max_memory_allocated_stays_within_the_budget_plus_transients(fraction):
    """The budget covers what the plan holds (weights, buffers, optimizer state, gradients,
    saved activations); the allocator also sees transients the plan does not count: the
    logits in bf16 and fp32 with their gradients, and one block's working set in its backward.
    `auto` leaves 10% of the GPU for them."""
    cfg = load_config(None, {"model.preset": "small", "train.dtype": "bf16", "train.micro_batch": "8",
                             "train.seq_len": "256", "train.grad_accum": "1"})
    cost = default_cost(cfg)
    budget = int(fraction * plain_peak_for(cfg, cost))
    plan = plan_offload_for(cfg, budget, None, cost)
    B, T, V = 8, 256, cfg.model.vocab_size
    allowance = 2 * B * T * V * (2 + 4) + sum(block_act_bytes(cfg.model, B, T, 2).values())
    torch.manual_seed(0)
    torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda")  # cuBLAS workspace before the window
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    engine = apply_plan(GPT(cfg.model), plan, OPTIM, "cuda", compute_dtype=torch.bfloat16)
    try:
        g = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randint(0, cfg.model.vocab_size, (8, 256), generator=g)
            engine.train_step([(x, x.roll(-1, 1))], 1e-3, 1.0)
        engine.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    finally:
        engine.close()
    assert engine.peak_device_bytes <= budget
    assert peak <= budget + allowance, (f"allocator peak {peak} over the budget {budget} plus transients {allowance} "
                                        f"(ledger {engine.peak_device_bytes})")
