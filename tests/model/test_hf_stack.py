"""The block interface (hetrain.model.stack) on transformers models: run layer by layer, a
model computes what its own forward computes, for every family; its layers own the right
parameters; a model whose forward does more is refused; and a model cut into two pipeline
parts, the hidden states and extras handed over as a stage would send them, trains the same."""

import pytest
import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from hetrain.errors import ConfigError
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.model.stack import check_stack, layer_parameters, run_layers
from tests_support import HF_FAMILIES, tiny_hf_config

transformers = pytest.importorskip("transformers")

from hetrain.model.hf import build_hf_model  # noqa: E402

B, T = 2, 12


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g), torch.randint(0, 256, (B, T), generator=g)


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_layer_by_layer_is_the_models_own_forward(family):
    torch.manual_seed(0)
    model = build_hf_model(tiny_hf_config(family))
    check_stack(model, "this test")
    model.check_stages()
    x, y = batch()
    model.eval()  # GPT-2 has dropout: compare without it (training draws the same masks, tested in offload)
    with torch.no_grad():
        assert torch.equal(run_layers(model, x), model(x))
        assert torch.equal(run_layers(model, x, y), model(x, y))
    h, (args, kwargs) = model.embed_inputs(x)
    assert h.shape == (B, T, 64) and h.requires_grad
    assert not any(t.requires_grad for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_each_layer_owns_its_parameters(family):
    model = build_hf_model(tiny_hf_config(family))
    emb, block0, block1, head = (dict(owned) for owned in layer_parameters(model))
    prefix = f"hf_model.{model.blocks_path}."
    assert all(name.startswith(prefix + "0.") for name in block0) and block0
    assert all(name.startswith(prefix + "1.") for name in block1) and block1
    # The final norm and (unless tied to the input embedding) the output projection: the head.
    out = model.hf_model.get_output_embeddings().weight
    assert any(p is out for p in emb.values()) == (family == "gpt2")
    assert any(p is out for p in head.values()) == (family != "gpt2")
    assert head and all(prefix not in name for name in head)
    assert model.hf_model.get_input_embeddings().weight in emb.values()


def test_gpt_has_the_same_interface():
    torch.manual_seed(0)
    model = GPT(get_preset("tiny-llama"))
    check_stack(model, "this test")
    x, y = batch()
    assert torch.equal(run_layers(model, x, y), model(x, y))
    assert [len(owned) for owned in layer_parameters(model)] == [1, 6, 6, 2]


def gemma2(**overrides):
    return transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, **overrides)


def test_a_forward_that_does_more_than_its_layers_is_refused():
    # Gemma 2 caps its logits after the output projection: not a layer hetrain can drive.
    cfg = gemma2(final_logit_softcapping=30.0, layer_types=["full_attention", "full_attention"])
    with pytest.raises(ConfigError, match="does more than.*--memory.device_budget none"):
        build_hf_model(cfg).check_stages()


def test_blocks_called_with_different_inputs_are_refused():
    # Gemma 2 alternates sliding-window and full attention: its layers get different masks.
    with pytest.raises(ConfigError, match="layer 1 is not called like layer 0.*--memory.device_budget none"):
        build_hf_model(gemma2()).check_stages()


def test_two_pipeline_parts_train_like_the_whole_model():
    """What a pipeline stage needs: embedding and block 0 on one part, block 1 and the head on
    the other, the hidden states and the extras' tensors handed over (detached, as a send
    does), the gradient of the hidden states handed back."""
    torch.manual_seed(0)
    whole = build_hf_model(tiny_hf_config("llama"))
    torch.manual_seed(0)
    split = build_hf_model(tiny_hf_config("llama"))
    x, y = batch()
    whole(x, y).backward()

    h, extras = run_layers(split, x, start=0, stop=2)  # stage 0: embedding, block 0
    leaves, spec = tree_flatten(extras)
    sent = [t.detach().clone() if isinstance(t, torch.Tensor) else t for t in leaves]
    h_recv = h.detach().clone().requires_grad_()
    loss = run_layers(split, x, y, start=2, h=h_recv, extras=tree_unflatten(sent, spec))  # stage 1
    loss.backward()
    h.backward(h_recv.grad)  # stage 0's backward from the gradient stage 1 sends back
    torch.testing.assert_close(loss, whole(x, y), rtol=0, atol=0)
    for (name, a), b in zip(whole.named_parameters(), split.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
