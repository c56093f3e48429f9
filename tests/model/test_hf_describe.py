"""The description of transformers models against the real modules: saved bytes to the byte
(counted with saved-tensor hooks), parameters, tensors and FLOPs, for every family and the
variants that change what a block saves."""

import pytest
import torch
from torch.utils._pytree import tree_leaves

from hetrain.errors import ConfigError
from hetrain.memory import MemoryAccountant
from hetrain.model.stack import layer_parameters
from tests_support import HF_FAMILIES, reruns_of_last_matmul, tiny_hf_config

pytest.importorskip("transformers")

from hetrain.model.hf import build_hf_model  # noqa: E402

# Per family, the variants whose saved tensors differ: dropout (sdpa's math path and dropout
# masks), grouped-query against multi-head attention, sliding-window masks, activations,
# GPT-NeoX's sequential residual. GPT-2's defaults have dropout 0.1 everywhere.
VARIANTS = {
    "llama": [{}, {"attention_dropout": 0.1}, {"num_key_value_heads": 4}, {"tie_word_embeddings": True}],
    "mistral": [{}, {"sliding_window": 8}],
    "qwen2": [{}],
    "gpt2": [{}, {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}, {"activation_function": "gelu"},
             {"activation_function": "relu"}],
    "gpt_neox": [{}, {"use_parallel_residual": False}, {"hidden_dropout": 0.1, "attention_dropout": 0.1}],
}
CASES = [(family, variant) for family in HF_FAMILIES for variant in VARIANTS[family]]
B, T = 3, 12  # T differs from the head size (16), so a tensor's shape says what it is


def saved_bytes(fn, model, also_state=()):
    acct = MemoryAccountant(model, also_state=also_state)
    with acct.track_activations():
        out = fn()
    saved = acct.act_bytes
    del out
    acct.close()
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in v.items()) or 'default'}"
                                                      for f, v in CASES])
def test_saved_bytes_match_measured(family, variant, dtype):
    torch.manual_seed(0)
    model = build_hf_model(tiny_hf_config(family, **variant)).to(dtype)
    idx, targets = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    desc = model.describe(B, T, compute_dtype_bytes=dtype.itemsize)
    with torch.no_grad():
        h0, extras = model.embed_inputs(idx)
    h = h0.detach().requires_grad_()
    extra_tensors = [t for t in tree_leaves(extras) if isinstance(t, torch.Tensor)]

    block = saved_bytes(lambda: model.block_forward(model.blocks[0], h, extras), model, extra_tensors)
    assert block == desc.blocks[0].act_bytes_total
    assert saved_bytes(lambda: model.head(h, targets), model) == desc.head.act_bytes_total
    # What a block saves of the extras every block reads (rotary cos/sin; a sliding-window mask
    # is not saved itself, each block saves its own copy) is counted once, with the embedding.
    extras_saved = saved_bytes(lambda: model.block_forward(model.blocks[0], h, extras), model) - block
    assert saved_bytes(lambda: model.embed_inputs(idx), model) + extras_saved == desc.embedding.act_bytes_total
    # The whole model (dropout draws the same masks' sizes whatever the seed).
    assert saved_bytes(lambda: model(idx, targets), model) == sum(l.act_bytes_total for l in desc.layers())


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_params_tensors_and_flops_match_the_module(family):
    torch.manual_seed(0)
    model = build_hf_model(tiny_hf_config(family))
    desc = model.describe(1, T, compute_dtype_bytes=4)
    layers = layer_parameters(model)
    assert [l.params for l in desc.layers()] == [sum(p.numel() for _, p in owned) for owned in layers]
    assert [l.tensors for l in desc.layers()] == [len(owned) for owned in layers]
    assert desc.total_params == model.num_params()
    assert desc.train_flops_per_token() == model.train_flops_per_token(T)
    assert desc.tied_embeddings == (family == "gpt2")
    assert desc.buffers_bytes == sum(b.nbytes for b in model.buffers())
    assert len(desc.blocks) == 2 and desc.hidden_size == 64 and desc.vocab_size == 256


def test_other_model_types_are_refused_with_the_fix():
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(ConfigError, match="model types llama, mistral, qwen2, gpt2, gpt_neox.*--memory.device_budget none"):
        build_hf_model(cfg).describe(1, T)


def test_unknown_activation_is_refused():
    with pytest.raises(ConfigError, match="activation 'quick_gelu'"):
        build_hf_model(tiny_hf_config("llama", hidden_act="quick_gelu")).describe(1, T)


def test_qwen2_mixing_full_and_sliding_layers_is_refused():
    cfg = tiny_hf_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    with pytest.raises(ConfigError, match="mixes full and sliding-window layers.*--train.seq_len to 8"):
        build_hf_model(cfg).describe(1, T)
    assert build_hf_model(cfg).describe(1, 8).blocks[0].act_bytes_total > 0  # window not shorter than T: fine


def test_longer_than_the_config_allows_is_refused():
    with pytest.raises(ConfigError, match="max_position_embeddings=64"):
        build_hf_model(tiny_hf_config("llama")).describe(1, 65)


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{'-'.join(f'{k}={v}' for k, v in v.items()) or 'default'}"
                                                      for f, v in CASES])
def test_early_stop_skips_what_the_description_says(family, variant):
    """LayerDescription.early_stop_skips (priced by the cost model) against what torch reruns."""
    torch.manual_seed(0)
    model = build_hf_model(tiny_hf_config(family, **variant))
    desc = model.describe(B, T, compute_dtype_bytes=4)
    with torch.no_grad():
        h0, extras = model.embed_inputs(torch.randint(0, 256, (B, T)))
    h = h0.detach().requires_grad_()
    reruns = reruns_of_last_matmul(model.blocks[0], lambda: model.block_forward(model.blocks[0], h, extras))
    assert reruns == (0 if desc.blocks[0].early_stop_skips else 1)
