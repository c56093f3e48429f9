"""The offload engine on transformers models: every plan trains the same model as plain PyTorch.

For Llama, Mistral, Qwen2, GPT-2 (tied embeddings, dropout 0.1) and GPT-NeoX, 2 blocks of
hidden size 64: the textbook loop on the HF model's own forward (fused AdamW, decay on
matrices only, warmup-cosine lr, accumulation 2, clip_grad_norm_ 1.0) against the engine
under four plans: every block recomputed, every block's weights streamed, every block updated
by the CPU optimizer, and the offload planner's plan for 40% of plain training's device
memory, whose budget the engine enforces. Losses and parameters after 10 steps agree to 1e-6
relative (fp32).
"""

import math

import pytest
import torch

from hetrain.config import load_config
from hetrain.offload import OptimConfig, apply_plan
from hetrain.plan.offload.plan import OffloadPlan
from tests_support import HF_FAMILIES, save_tiny_hf, textbook_training

pytest.importorskip("transformers")

from hetrain.model.hf import load_hf_model  # noqa: E402

STEPS, ACCUM, MICRO, SEQ = 10, 2, 2, 16
OPTIM = OptimConfig(weight_decay=0.1, beta1=0.9, beta2=0.95)
PLANS = ["recompute", "stream", "cpu_optim", "planner"]


def lr_at(step: int, peak=3e-3, floor=3e-4, warmup=2) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * (step - warmup) / (STEPS - warmup)))


def make_batches(seed=1):
    """Counting sequences from random starts (each token the previous plus one): learnable in a
    few steps, so the losses really move."""
    g = torch.Generator().manual_seed(seed)

    def micro():
        seq = (torch.randint(0, 256, (MICRO, 1), generator=g) + torch.arange(SEQ + 1)) % 256
        return seq[:, :-1], seq[:, 1:]

    return [[micro() for _ in range(ACCUM)] for _ in range(STEPS)]


BATCHES = make_batches()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {family: str(save_tiny_hf(root / family, family)) for family in HF_FAMILIES}


_REFERENCES = {}


def reference(path):
    """The textbook loop (tests_support.textbook_training) on the HF model (its own forward, dropout
    included)."""
    if path not in _REFERENCES:
        torch.manual_seed(0)
        _REFERENCES[path] = textbook_training(load_hf_model(path), BATCHES[:STEPS], OPTIM, lr_at, ACCUM,
                                              dropout_seed=7)
    return _REFERENCES[path]


def plan_for(kind: str, path: str) -> OffloadPlan:
    if kind == "recompute":
        return OffloadPlan.prefix_suffix(2, recompute=2)
    if kind == "stream":
        return OffloadPlan.prefix_suffix(2, stream=2)
    if kind == "cpu_optim":
        return OffloadPlan.prefix_suffix(2, cpu_optim=2)
    from hetrain.train.offload_planning import default_cost, plain_peak_for, plan_offload_for

    cfg = load_config(None, {"hf.path": path, "train.micro_batch": str(MICRO), "train.seq_len": str(SEQ),
                             "train.grad_accum": str(ACCUM), "hardware.device_kind": "cpu", "run.device": "cpu"})
    cost = default_cost(cfg)
    budget = int(0.4 * plain_peak_for(cfg, cost))
    plan = plan_offload_for(cfg, budget, None, cost)
    assert plan.device_budget_bytes == budget and plan.predicted_peak_device_bytes <= budget
    assert any(l.act == "recompute" or l.weights == "host" or l.optim == "host" for l in plan.layers)
    return plan


@pytest.mark.parametrize("kind", PLANS)
@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_every_plan_trains_like_plain_pytorch(folders, family, kind):
    path = folders[family]
    ref_losses, ref_state = reference(path)
    assert ref_losses[-1] < ref_losses[0] - 0.2  # it trained
    plan = plan_for(kind, path)
    torch.manual_seed(0)
    engine = apply_plan(load_hf_model(path), plan, OPTIM, "cpu")  # the planner's budget is enforced
    try:
        torch.manual_seed(7)
        losses = [engine.train_step(BATCHES[s], lr_at(s), 1.0).loss for s in range(STEPS)]
        state = {k: v.clone() for k, v in engine.state_dict()["model"].items()}
        peak = engine.peak_device_bytes
    finally:
        engine.close()
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)
    if kind == "planner":
        assert peak <= plan.device_budget_bytes


def engine_losses(model, plan, dtype):
    engine = apply_plan(model, plan, OPTIM, "cpu", compute_dtype=dtype)
    try:
        return [engine.train_step(BATCHES[s], lr_at(s), 1.0).loss for s in range(STEPS)]
    finally:
        engine.close()


def test_bf16_weights_under_a_mixed_plan_train_like_the_resident_plan(folders):
    """bf16 compute (bf16 flats, fp32 masters): recomputing, streaming and CPU-updating blocks
    changes nothing against the all-resident plan, on Llama."""
    torch.manual_seed(0)
    resident = engine_losses(load_hf_model(folders["llama"]), OffloadPlan.resident(2), torch.bfloat16)
    torch.manual_seed(0)
    mixed = engine_losses(load_hf_model(folders["llama"]),
                          OffloadPlan.prefix_suffix(2, recompute=1, stream=2, cpu_optim=1), torch.bfloat16)
    assert mixed == pytest.approx(resident, rel=1e-6)
    assert resident[-1] < resident[0] - 0.2
