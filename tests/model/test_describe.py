"""The analytic model description against the real module: parameters, saved bytes, FLOPs."""

import dataclasses
import itertools

import pytest
import torch

from hetrain.memory import MemoryAccountant
from hetrain.model.describe import describe_model
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset, preset_names
from tests_support import reruns_of_last_matmul


@pytest.mark.parametrize("name", preset_names())
def test_param_count_matches_module(name):
    cfg = get_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    desc = describe_model(cfg, micro_batch=1, seq_len=min(cfg.max_seq_len, 128))
    assert desc.total_params == model.num_params()
    assert desc.blocks[0].params == sum(p.numel() for p in model.blocks[0].parameters())


def test_published_sizes():
    # Parameter counts of the published architectures (GPT-2 124M, Llama 2 7B/70B).
    def params(name):
        cfg = get_preset(name)
        return describe_model(cfg, 1, 128).total_params

    assert round(params("gpt2-small") / 1e6) == 124
    assert round(params("llama2-7b") / 1e8) == 67
    assert round(params("llama2-70b") / 1e9) == 69
    assert 170e9 < params("gpt3-175b") < 176e9
    assert 135e9 < params("llama-140b") < 145e9


def _measured_saved_bytes(module_fn, model):
    acct = MemoryAccountant(model)
    with acct.track_activations():
        out = module_fn()
    saved = acct.act_bytes
    del out
    assert acct.act_bytes == 0, "saved tensors must be released with the graph"
    acct.close()
    return saved


VARIANTS = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [4, 2]))


@pytest.mark.parametrize("pos,norm,mlp,n_kv_head", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout,on_attention", [(0.0, True), (0.1, True), (0.1, False)],
                         ids=["no-dropout", "dropout", "residual-dropout"])
def test_activation_bytes_match_measured_forward(pos, norm, mlp, n_kv_head, dtype, dropout, on_attention):
    cfg = dataclasses.replace(get_preset("tiny"), pos=pos, norm=norm, mlp=mlp, n_kv_head=n_kv_head, d_ff=96,
                              dropout=dropout, dropout_attention=on_attention)
    torch.manual_seed(0)
    model = GPT(cfg).to(dtype)
    B, T = 3, 20
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    desc = describe_model(cfg, B, T, compute_dtype_bytes=torch.finfo(dtype).bits // 8)
    h = model.embed(idx).detach().requires_grad_()

    block = _measured_saved_bytes(lambda: model.blocks[0](h, model.rope()), model)
    emb = _measured_saved_bytes(lambda: model.embed(idx), model)
    head = _measured_saved_bytes(lambda: model.head(h, idx), model)
    assert block == desc.blocks[0].act_bytes_total
    assert emb == desc.embedding.act_bytes_total
    assert head == desc.head.act_bytes_total


def test_whole_model_saved_bytes_is_sum_of_layers():
    cfg = get_preset("tiny")
    model = GPT(cfg)
    idx, targets = torch.randint(0, 256, (2, 32)), torch.randint(0, 256, (2, 32))
    measured = _measured_saved_bytes(lambda: model(idx, targets), model)
    desc = describe_model(cfg, 2, 32, compute_dtype_bytes=4)
    # Each residual add makes a new tensor, so no storage is shared between layers.
    assert measured == sum(layer.act_bytes_total for layer in desc.layers())


def test_flops_close_to_6n_rule():
    cfg = get_preset("gpt3-175b")
    desc = describe_model(cfg, 1, 2048)
    n_matmul = desc.total_params - desc.embedding.params  # embedding lookups do no matmul
    six_n = 6 * (n_matmul + cfg.vocab_size * cfg.d_model)
    # The attention term adds 6*T*C per layer per token on top of 6N.
    attention = 6 * 2048 * cfg.d_model * cfg.n_layer
    assert desc.train_flops_per_token() == pytest.approx(six_n + attention, rel=0.01)


def test_sequence_longer_than_model_rejected():
    with pytest.raises(ValueError, match="max_seq_len"):
        describe_model(get_preset("tiny"), 1, 10_000)


@pytest.mark.parametrize("dropout,on_attention", [(0.0, True), (0.1, True), (0.1, False)],
                         ids=["no-dropout", "dropout", "residual-dropout"])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_early_stop_skips_what_the_description_says(dropout, on_attention, mlp):
    """LayerDescription.early_stop_skips (priced by the cost model) against what torch reruns."""
    cfg = dataclasses.replace(get_preset("tiny"), mlp=mlp, dropout=dropout, dropout_attention=on_attention)
    torch.manual_seed(0)
    model = GPT(cfg)
    block = describe_model(cfg, 2, 16).blocks[0]
    h = model.embed(torch.randint(0, cfg.vocab_size, (2, 16))).detach().requires_grad_()
    reruns = reruns_of_last_matmul(model.blocks[0], lambda: model.blocks[0](h, model.rope()))
    assert reruns == (0 if block.early_stop_skips else 1)
    assert block.early_stop_skips == (0 if dropout else 1)


def test_tensor_parallel_degrees_allow_residual_dropout_only():
    """Dropout on the residual branches leaves the heads splittable (every TP rank draws the same
    masks for the replicated activations); on the attention probabilities it does not."""
    cfg = dataclasses.replace(get_preset("tiny"), n_head=4, n_kv_head=2, d_ff=96)
    assert describe_model(cfg, 1, 16).tp_heads == 2
    assert describe_model(dataclasses.replace(cfg, dropout=0.1), 1, 16).tp_heads == 1
    assert describe_model(dataclasses.replace(cfg, dropout=0.1, dropout_attention=False), 1, 16).tp_heads == 2
