"""Hugging Face models through hetrain's adapter against the same models used directly."""

import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

transformers = pytest.importorskip("transformers")

from hetrain.errors import ConfigError  # noqa: E402
from hetrain.model.describe import describe_model  # noqa: E402
from hetrain.model.gpt import ModelConfig  # noqa: E402
from hetrain.model.hf import HFCausalLM, load_hf_model  # noqa: E402

VOCAB, T, B = 256, 16, 4

# Tiny configs of the layouts the block finder must handle: (config class, kwargs, layer class).
TINY = {
    "llama": ("LlamaConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "LlamaDecoderLayer"),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                bos_token_id=0, eos_token_id=0), "GPT2Block"),
    "mistral": ("MistralConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
                "MistralDecoderLayer"),
    "qwen2": ("Qwen2Config", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
              "Qwen2DecoderLayer"),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64), "GPTNeoXLayer"),
}


@pytest.fixture(autouse=True)
def one_thread():
    # One intra-op thread: reductions run in a fixed order, so the two training runs below
    # can be compared to the bit.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(kind: str = "llama"):
    cls_name, kwargs, _ = TINY[kind]
    return getattr(transformers, cls_name)(**kwargs)


@pytest.fixture
def llama_dir(tmp_path):
    """A folder holding only the tiny Llama's config.json (so: random init)."""
    tiny_config().save_pretrained(tmp_path)
    return tmp_path


def batches(n: int, seed: int = 1):
    """Counting sequences (each token is the previous plus one) from random starts: learnable
    in a few steps, so the loss curve really moves."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        start = torch.randint(0, VOCAB, (B, 1), generator=gen)
        seq = (start + torch.arange(T + 1)) % VOCAB  # (B, T+1)
        yield seq[:, :-1], seq[:, 1:]  # inputs, targets shifted by one


@pytest.mark.parametrize("kind", sorted(TINY))
def test_blocks_found(kind, tmp_path):
    cfg = tiny_config(kind)
    cfg.save_pretrained(tmp_path)
    model = load_hf_model(str(tmp_path))
    assert len(model.blocks) == cfg.num_hidden_layers
    assert {type(b).__name__ for b in model.blocks} == {TINY[kind][2]}
    # The live list inside the HF model, registered once (no duplicated state_dict keys).
    assert model.blocks is model.hf_model.get_submodule(model.blocks_path)
    assert not any(key.startswith("blocks.") for key in model.state_dict())


def test_config_file_path_and_dtype(llama_dir):
    model = load_hf_model(str(llama_dir / "config.json"), dtype=torch.bfloat16)
    assert model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.zeros(1, T, dtype=torch.long)).shape == (1, T, VOCAB)


def test_random_init_follows_the_callers_seed(llama_dir):
    torch.manual_seed(3)
    a = load_hf_model(str(llama_dir))
    torch.manual_seed(3)
    b = load_hf_model(str(llama_dir))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_loads_saved_weights(tmp_path):
    torch.manual_seed(0)
    saved = transformers.AutoModelForCausalLM.from_config(tiny_config())
    saved.save_pretrained(tmp_path)
    torch.manual_seed(1)  # a different seed: the weights must come from the files
    model = load_hf_model(str(tmp_path))
    assert model.training
    expected = saved.state_dict()
    got = model.hf_model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_loss_is_cross_entropy_of_the_logits(llama_dir):
    torch.manual_seed(0)
    model = load_hf_model(str(llama_dir))
    x, y = next(batches(1))
    logits = model.hf_model(input_ids=x).logits
    expected = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
    torch.testing.assert_close(model(x, y), expected, rtol=0, atol=0)
    torch.testing.assert_close(model(x), logits, rtol=0, atol=0)
    # Comparable with HF's own shifted loss on the one-longer sequence.
    seq = torch.cat([x, y[:, -1:]], dim=1)
    hf_loss = model.hf_model(input_ids=seq, labels=seq).loss
    torch.testing.assert_close(model(x, y), hf_loss, rtol=1e-5, atol=1e-5)


def test_same_loss_curve_as_plain_pytorch(llama_dir):
    steps = 10
    torch.manual_seed(0)
    model = load_hf_model(str(llama_dir))
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(str(llama_dir), local_files_only=True))
    ref.train()
    for pa, pb in zip(model.hf_model.parameters(), ref.parameters()):
        assert torch.equal(pa, pb)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for x, y in batches(steps):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref_losses = []
    for x, y in batches(steps):
        logits = ref(input_ids=x).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1))
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()
        ref_losses.append(loss.detach())

    assert ref_losses[-1] < ref_losses[0] - 0.2  # it did train
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-6, atol=1e-6)
    for (name, pa), pb in zip(model.hf_model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-6, msg=name)


def test_blocks_can_be_wrapped_from_outside(llama_dir):
    # What the techniques do to model.blocks: wrap each block, passing through whatever the
    # HF model calls it with. Activation checkpointing must not change loss or gradients.
    class Checkpointed(torch.nn.Module):
        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, *args, **kwargs):
            return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    torch.manual_seed(0)
    model = load_hf_model(str(llama_dir))
    x, y = next(batches(1))
    loss = model(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = Checkpointed(block)
    loss_ckpt = model(x, y)
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_params_and_flops_follow_describe_conventions(llama_dir):
    model = load_hf_model(str(llama_dir))
    assert model.num_params() == sum(p.numel() for p in model.hf_model.parameters())
    # hetrain's own GPT of the same shape: the analytic description must agree.
    same_shape = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128,
                             max_seq_len=64, pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
    desc = describe_model(same_shape, micro_batch=1, seq_len=T)
    assert model.train_flops_per_token(T) == desc.train_flops_per_token()
    assert model.num_params() == desc.total_params


def test_gpt2_flops_count_tied_head_and_conv1d(tmp_path):
    tiny_config("gpt2").save_pretrained(tmp_path)
    model = load_hf_model(str(tmp_path))
    C, L = 64, 2
    per_block = C * 3 * C + C * C + C * 4 * C + 4 * C * C  # c_attn, c_proj, c_fc, mlp c_proj
    expected = 6 * (L * per_block + VOCAB * C) + 6 * T * C * L
    assert model.train_flops_per_token(T) == expected


def test_too_long_sequence_is_an_error(llama_dir):
    model = load_hf_model(str(llama_dir))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_missing_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--hf.path"):
        load_hf_model(str(tmp_path / "nope"))


def test_folder_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--hf.path.*config.json"):
        load_hf_model(str(tmp_path))


def test_unknown_model_type_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ConfigError, match="--hf.path"):
        load_hf_model(str(tmp_path))


def test_missing_transformers_is_a_config_error(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ConfigError, match=r"pip install 'hetrain\[hf\]'"):
        load_hf_model(str(llama_dir))


def test_wraps_a_model_built_in_memory():
    torch.manual_seed(0)
    model = HFCausalLM(transformers.AutoModelForCausalLM.from_config(tiny_config()))
    assert model.blocks_path == "model.layers"
    assert model.vocab_size == VOCAB and model.max_seq_len == 64
