"""Cost model: figures from a (hand-made) profile, and the catalog roofline checked by hand."""

import dataclasses

import pytest
import torch

from hetrain.config import load_config
from hetrain.errors import ConfigError
from hetrain.hardware.catalog import get_kind
from hetrain.model.describe import describe_model
from hetrain.model.presets import get_preset
from hetrain.predict.cost import (
    LayerTiming, ModelProfile, Profile, ProfileCost, RooflineCost, UpdateTiming, cost_model,
)
from hetrain.model.spec import ModelSpec
from hetrain.train.job import describe, job_cost
from hetrain.predict.profile_store import machine_fingerprint


def _profile(micro_batch=2) -> Profile:
    entry = ModelProfile(
        model=dataclasses.asdict(get_preset("tiny")), micro_batch=micro_batch, seq_len=16, dtype="fp32", threads=2,
        embedding=LayerTiming(1e-4, 2e-4, 1e-4, 1_000), block=LayerTiming(1e-3, 2e-3, 1.1e-3, 50_000),
        head=LayerTiming(5e-4, 1e-3, 5e-4, 9_000))
    return Profile(
        machine=machine_fingerprint(), device="cpu",
        copy_bytes_per_s=dict.fromkeys(("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")),
        cpu_adam_params_per_s={1: 1e8, 2: 1.8e8},
        optimizer=UpdateTiming(per_call_s=1e-4, per_tensor_s=1e-5, params_per_s=2e8),
        clip=UpdateTiming(per_call_s=5e-5, per_tensor_s=2e-6, params_per_s=1e9),
        grad_accumulate=UpdateTiming(per_call_s=0.0, per_tensor_s=1e-6, params_per_s=5e8),
        collective={"backend": "gloo", "world_size": 2, "seconds_by_bytes": {1_000: 1e-4, 1_000_000: 1e-3}},
        unmeasured={"copy.h2d_pinned": "no accelerator"}, models=[entry])


def _cfg(**values):
    base = {"model.preset": "tiny", "train.micro_batch": "2", "train.seq_len": "16", "run.threads": "2"}
    return load_config(None, {**base, **{k: str(v) for k, v in values.items()}})


def test_profile_cost_reads_the_measurements():
    cfg = _cfg()
    desc = describe(cfg)
    cost = job_cost(cfg, _profile(), desc)
    assert isinstance(cost, ProfileCost)
    block, emb, head = desc.blocks[1], desc.embedding, desc.head
    assert (cost.fwd_s(block), cost.bwd_s(block)) == (1e-3, 2e-3)
    # The measured forward-again, less the down projection torch's early stop skips (FLOP share).
    down = 2.0 * desc.config.d_ff * desc.config.d_model / block.fwd_flops_per_token
    assert block.early_stop_skips == 1 and block.early_stop_flops_share == pytest.approx(down)
    assert cost.recompute_s(block) == pytest.approx(1.1e-3 * (1 - down))
    # With a measured GEMM line, the skipped down projection is priced on it instead.
    line = {"dtype": "float32", "s_per_flop": 1e-11, "overhead_s": 2e-6, "points": []}
    profiled = job_cost(cfg, dataclasses.replace(_profile(), matmul=line), desc)
    tokens = desc.micro_batch * desc.seq_len
    down_s = 2.0 * tokens * desc.config.d_ff * desc.config.d_model * 1e-11 + 2e-6
    assert profiled.recompute_s(block) == pytest.approx(1.1e-3 - down_s)
    assert (cost.fwd_s(emb), cost.bwd_s(head), cost.act_bytes(head)) == (1e-4, 1e-3, 9_000)
    assert cost.optimizer_s(1_000, 2) == pytest.approx(2 * 1e-5 + 1_000 / 2e8)
    assert cost.optimizer_call_s() == 1e-4
    assert cost.optimizer_s(1_000, 2, on="cpu") == pytest.approx(1_000 / 1.8e8)  # 2 threads
    assert cost.clip_s(1_000, 10) == pytest.approx(5e-5 + 10 * 2e-6 + 1_000 / 1e9)
    assert cost.grad_accumulate_s(1_000, 2) == pytest.approx(2 * 1e-6 + 1_000 / 5e8)


def test_cost_model_takes_a_model_and_a_batch_not_the_config():
    spec = ModelSpec.gpt(get_preset("tiny"))
    desc = spec.describe(16, 2, 4)
    cost = cost_model(spec, desc, "fp32", threads=2, profile=_profile())
    assert isinstance(cost, ProfileCost) and cost.fwd_s(desc.blocks[0]) == 1e-3
    with pytest.raises(ConfigError, match="threads=1"):
        cost_model(spec, desc, "fp32", threads=1, profile=_profile())
    assert isinstance(cost_model(spec, desc, "fp32", kind_name="H100-SXM", profile=_profile()), RooflineCost)


def test_profile_cost_scales_linearly_with_micro_batch():
    cfg = _cfg(**{"train.micro_batch": 6})
    cost = job_cost(cfg, _profile(micro_batch=2))
    block = describe(cfg).blocks[0]
    assert cost.fwd_s(block) == pytest.approx(3e-3)
    assert cost.act_bytes(block) == 150_000
    assert "scaled from micro_batch=2" in cost.source


def test_profile_cost_collectives_and_missing_copies():
    cfg = _cfg()
    cost = job_cost(cfg, _profile())
    # Halfway between 1 kB and 1 MB in log(bytes) is halfway between their times.
    assert cost.allreduce_s(31_623, 2) == pytest.approx(5.5e-4, rel=1e-4)
    assert cost.allreduce_s(2_000_000, 2) == pytest.approx(2e-3)        # largest size's bandwidth
    assert cost.allreduce_s(1_000_000, 4) == pytest.approx(1e-3 * 1.5)  # ring volume 2(n-1)/n
    with pytest.raises(ConfigError, match="h2d_pinned was not measured.*no accelerator"):
        cost.copy_s(1 << 20, "h2d")


def test_factory_picks_catalog_or_profile_and_explains_gaps():
    cfg = _cfg(**{"hardware.device_kind": "H100-SXM"})
    assert isinstance(job_cost(cfg, _profile()), RooflineCost)
    cfg = _cfg(**{"train.seq_len": 32})
    with pytest.raises(ConfigError, match="no measurements of model 'tiny'.*seq_len=32.*hetrain profile"):
        job_cost(cfg, _profile())
    cfg = _cfg(**{"run.threads": 1})
    with pytest.raises(ConfigError, match="threads=1"):
        job_cost(cfg, _profile())
    with pytest.raises(ConfigError, match="known kinds: V100"):
        job_cost(_cfg(**{"hardware.device_kind": "Z9000"}), None, describe(_cfg()))


def test_roofline_by_hand_on_h100():
    # GPT-2 small block, micro-batch 8 x 1024 tokens, bf16 (the step's bf16 weight copy), H100 SXM: 989.4 TFLOP/s,
    # 3350 GB/s, the GPU default curve (80% of peak, 8 us per GEMM, attention at 50%).
    desc = describe_model(get_preset("gpt2-small"), 8, 1024, compute_dtype_bytes=2)
    cost = RooflineCost(desc, get_kind("H100-SXM"), "bf16")
    block = desc.blocks[0]
    tokens, peak, bw = 8192, 989.4e12, 3350e9 * 0.75
    gemms = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
    gemm_s = sum(2 * tokens * k * n / (peak * 0.8) + 8e-6 for k, n in gemms)
    attention_s = 2 * 1024 * 768 * tokens / (peak * 0.5)      # causal: 2 * T * C FLOPs per token
    elementwise_s = (block.act_bytes_total + 2 * tokens * 768 * 2) / bw  # the weights are read in bf16 (no casts)
    assert cost.fwd_s(block) == pytest.approx(gemm_s + attention_s + elementwise_s + 20e-6)
    grads_s = 2 * 4 * block.params / bw
    assert cost.bwd_s(block) == pytest.approx(2 * (gemm_s + attention_s + elementwise_s) + grads_s + 40e-6)
    # Recomputed whole, the block stops before its down projection (torch's early stop; no dropout).
    down_s = 2 * tokens * 3072 * 768 / (peak * 0.8) + 8e-6
    assert cost.recompute_s(block) == pytest.approx(cost.fwd_s(block) - down_s)

    # AdamW is memory-bound: 28 bytes per parameter over 75% of 3350 GB/s.
    assert cost.optimizer_s(10**9, 100) == pytest.approx(28e9 / (3350e9 * 0.75))
    # The step's bf16 copy of the weights: read 4 bytes, write 2, once per step.
    assert cost.weight_copy_s(10**9) == pytest.approx(6e9 / (3350e9 * 0.75))
    assert RooflineCost(desc, get_kind("H100-SXM"), "fp32").weight_copy_s(10**9) == 0
    # Accumulating into a held gradient: 12 bytes per parameter.
    assert cost.grad_accumulate_s(10**9, 100) == pytest.approx(12e9 / (3350e9 * 0.75))
    # CPU Adam is priced on the catalog's 'cpu' host kind (100 GB/s declared).
    assert cost.optimizer_s(10**9, 100, on="cpu") == pytest.approx(28e9 / (100e9 * 0.75))
    # PCIe 5.0 x16: 64 GB/s per direction at 80%; pageable at half of that.
    assert cost.copy_s(10**9, "h2d") == pytest.approx(1e9 / (64e9 * 0.8))
    assert cost.copy_s(10**9, "d2h", pinned=False) == pytest.approx(1e9 / (64e9 * 0.8 * 0.5))
    # Ring all-reduce of 1 GB over 8 ranks on a 450 GB/s link: 2*7/8 GB at 70%, 14 hops of 20 us.
    assert cost.allreduce_s(10**9, 8, link_bytes_per_s=450e9) == pytest.approx(
        1.75e9 / (450e9 * 0.7) + 14 * 20e-6)


def test_matmul_efficiency_rises_with_the_gemm_and_predicted_mfu_with_the_model():
    from hetrain.predict.roofline import curve_for

    h200 = get_kind("H200")
    curve = curve_for(h200)
    assert curve.max_efficiency == 0.80 and "H200" in curve.source  # the catalog's measured figure
    effs = [curve.efficiency(2 * n**3, h200.peak_flops_per_s("bf16")) for n in (256, 1024, 4096, 16384)]
    assert effs == sorted(effs) and effs[0] < 0.1 and effs[-1] > 0.79
    # Plain training of GPT-3 sizes on one kind, every layer on the same roofline: the
    # predicted model FLOP/s per peak rises with the model's width, as measured runs do.
    mfu = []
    for preset in ("gpt3-1.3b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b"):
        cfg = load_config(None, {"model.preset": preset, "train.micro_batch": "1", "train.seq_len": "2048",
                                 "train.dtype": "bf16", "hardware.device_kind": "H200"})
        desc = describe(cfg)
        cost = RooflineCost(desc, h200, "bf16")
        step_s = sum(cost.fwd_s(layer) + cost.bwd_s(layer) for layer in desc.layers())
        mfu.append(desc.train_flops_per_token() * desc.tokens_per_microbatch / step_s / h200.peak_flops_per_s("bf16"))
    assert mfu == sorted(mfu) and mfu[0] < 0.6 < mfu[-1] < 0.75  # 0.53 -> 0.68 (2026-12-05)


def test_roofline_counts_the_bf16_weight_copies_as_the_trainer_saves_them():
    """The trainer's bf16 (hetrain.precision) saves, beyond the description's bf16 layout, the
    step's bf16 copy of the weights its operations save, which the CPU's memory accountant counts
    as activations; on a GPU the copy is one allocation for the step (the step graph's "cast"
    task), and a block saves LayerNorm inputs, statistics and weights in fp32 beyond the layout
    (CUDA's autocast runs layer_norm in fp32, the CPU's in bf16). On this CPU the prediction is
    the block's bytes as the trainer's memory accountant counts them, to the byte."""
    desc = describe_model(get_preset("tiny"), 4, 32, compute_dtype_bytes=2)
    block = desc.blocks[0]
    fp32 = RooflineCost(desc, get_kind("cpu"), "fp32")
    bf16 = RooflineCost(desc, get_kind("cpu"), "bf16")
    assert fp32.act_bytes(block) == block.act_bytes_total
    # tiny: d_model 64, d_ff 256: bf16 copies of 49,152 matmul weights and two LayerNorms' 64
    # weights; on a GPU the LayerNorms' (128 tokens x 64) inputs, (mean, rstd) and weights in
    # fp32, and the whole model's copy held by the step graph from "cast" to "release".
    assert bf16.act_bytes(block) == block.act_bytes_total + 49_152 * 2 + 2 * 64 * 2
    gpu = RooflineCost(desc, get_kind("H100-SXM"), "bf16")
    assert gpu.act_bytes(block) == block.act_bytes_total + 2 * (128 * 64 * 2 + 128 * 2 * 2 + 64 * 4)
    from hetrain.predict.step_graph import build_step_graph

    tasks = {t.name: t for t in build_step_graph(desc, gpu).tasks}
    assert tasks["cast"].alloc == {"device": 2 * desc.total_params}
    assert tasks["release"].free == {"device": 2 * desc.total_params}
    assert "cast" in {t.name for t in build_step_graph(desc, bf16).tasks}
    assert "release" not in {t.name for t in build_step_graph(desc, bf16).tasks}

    from hetrain.memory import MemoryAccountant
    from hetrain.model.gpt import GPT
    from hetrain.precision import WeightCopies, autocast

    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    copies = WeightCopies(model, torch.bfloat16)
    acct = MemoryAccountant(model)
    copies.make()  # with autograd, as the trainer makes them
    with torch.no_grad(), copies.active():
        h = model.embed(torch.randint(0, 64, (4, 32)))
    h.requires_grad_()
    with acct.track_activations(), copies.active(), autocast(torch.device("cpu"), torch.bfloat16):
        out = model.blocks[0](h, model.rope())
    assert h.dtype == torch.bfloat16
    assert acct.act_bytes == bf16.act_bytes(block)
    del out
    acct.close()
