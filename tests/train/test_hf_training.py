"""A Hugging Face Llama-family model trained through the hetrain trainer equals a plain loop."""

import pytest
import torch

from hetrain.data import build_data
from hetrain.train.trainer import Trainer

transformers = pytest.importorskip("transformers")


@pytest.fixture
def llama_dir(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_hf_llama_same_loss_curve_as_plain_pytorch(tiny_config, llama_dir):
    cfg = tiny_config(**{"hf.path": str(llama_dir), "train.warmup_steps": 0, "train.lr": 1e-3,
                         "train.min_lr": 1e-3, "train.grad_clip": 0})
    result = Trainer(cfg).fit()

    # The reference: the HF model used directly, its own loss head, the textbook loop.
    torch.manual_seed(cfg.run.seed)
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(llama_dir))
    ref.train()
    data = build_data(cfg.data, cfg.run.seed)
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    rest = [p for p in ref.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=True)
    losses = []
    for _ in range(cfg.train.steps):
        x, y = data.train.next_batch(cfg.train.micro_batch, cfg.train.seq_len)
        logits = ref(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert [result.losses[s] for s in range(1, cfg.train.steps + 1)] == pytest.approx(losses, rel=1e-5)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_resume_is_exact(tiny_config, tmp_path, llama_dir, family):
    """Nothing between loading a checkpoint and the first step draws from the global RNG (the
    start-up peak-FLOPs measurement once did), so a resumed run repeats the same steps."""
    path = llama_dir
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64)
        cfg.save_pretrained(tmp_path / "gpt2")
        path = tmp_path / "gpt2"
    measured = {"hf.path": str(path), "log.peak_flops": 0}  # MFU from a matmul measured at start-up
    straight = Trainer(tiny_config(tmp_path / "a", **measured)).fit()
    step5 = tmp_path / "a" / "checkpoints" / "step_00000005"
    resumed = Trainer(tiny_config(tmp_path / "b", **measured, **{"run.resume": str(step5)})).fit()
    assert [resumed.losses[s] for s in range(6, 11)] == pytest.approx([straight.losses[s] for s in range(6, 11)],
                                                                       rel=1e-6)
