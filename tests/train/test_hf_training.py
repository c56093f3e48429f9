"""Hugging Face models through the hetrain trainer: a plain loop's losses, exact resumes for every
family, offload plans from the command line, the exported transformers folder, the tokenizer."""

import json

import pytest
import torch
from safetensors.torch import load_file

from hetrain.cli import main
from hetrain.data import build_data
from hetrain.errors import ConfigError
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.train.trainer import Trainer
from tests_support import HF_FAMILIES, cli_args, save_tiny_hf

transformers = pytest.importorskip("transformers")

from hetrain.model.hf import load_hf_model  # noqa: E402


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


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_resume_is_exact(tiny_config, tmp_path, family):
    """Nothing between loading a checkpoint and the first step draws from the global RNG (the
    start-up peak-FLOPs measurement once did), so a resumed run repeats the same steps; GPT-2's
    dropout masks included (the RNG is in the checkpoint)."""
    path = save_tiny_hf(tmp_path / family, family)
    measured = {"hf.path": str(path), "log.peak_flops": 0}  # MFU from a matmul measured at start-up
    straight = Trainer(tiny_config(tmp_path / "a", **measured)).fit()
    step5 = tmp_path / "a" / "checkpoints" / "step_00000005"
    resumed = Trainer(tiny_config(tmp_path / "b", **measured, **{"run.resume": str(step5)})).fit()
    assert [resumed.losses[s] for s in range(6, 11)] == pytest.approx([straight.losses[s] for s in range(6, 11)],
                                                                       rel=1e-6)


def logits_of(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_cli_plans_for_40_percent_trains_like_plain_and_exports_a_transformers_folder(tmp_path, corpus, capsys):
    """The issue's check: `hetrain train --hf.path DIR --memory.device_budget 40%` plans, prints the
    plan, trains the same model as plain training, resumes under
    the plan exactly, and writes a folder transformers loads with the trained model's logits."""
    path = save_tiny_hf(tmp_path / "llama", "llama")
    base = {"hf.path": str(path), "hardware.device_kind": "cpu", "run.device": "cpu", "train.grad_accum": 2}
    assert main(["train", *cli_args(tmp_path / "plain", corpus, **base)]) == 0
    capsys.readouterr()
    assert main(["train", *cli_args(tmp_path / "run", corpus, **base, **{"memory.device_budget": "40%"})]) == 0
    out = capsys.readouterr().out
    assert "pred. memory" in out and "Device budget" in out and "40% of the" in out
    plan = OffloadPlan.load(tmp_path / "run" / "plan.json")
    assert any(l.act == "recompute" or l.weights == "host" or l.optim == "host" for l in plan.layers)
    assert plan.made_for["model.hf.model_type"] == "llama"

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert losses("run") == pytest.approx(losses("plain"), rel=1e-6)
    # Resumed at step 5 under the plan the checkpoint ran: the same last five steps.
    assert main(["train", *cli_args(tmp_path / "resumed", corpus, **base, **{
        "memory.device_budget": "40%", "run.resume": tmp_path / "run" / "checkpoints" / "step_00000005"})]) == 0
    assert losses("resumed")[-5:] == pytest.approx(losses("run")[-5:], rel=1e-6)

    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_model",
                                                                 local_files_only=True)
    trained = load_hf_model(str(path))
    trained.load_state_dict(load_file(tmp_path / "run" / "model.safetensors"), strict=False)
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(exported.eval()(input_ids=x).logits, logits_of(trained, x), rtol=0, atol=0)
    untrained = load_hf_model(str(path))
    assert not torch.equal(logits_of(untrained, x), logits_of(trained, x))
    # The export is a folder --hf.path loads again (its safetensors), to continue from.
    reloaded = load_hf_model(str(tmp_path / "run" / "hf_model"))
    torch.testing.assert_close(logits_of(reloaded, x), logits_of(trained, x), rtol=0, atol=0)


def save_tokenizer(folder, corpus):
    """A byte-level BPE tokenizer of 300 ids trained on the corpus, saved as transformers does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus.read_text().splitlines(keepends=True)[:2000], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def test_the_folders_tokenizer_reads_the_corpus_and_travels_with_the_export(tiny_config, tmp_path, corpus):
    path = save_tiny_hf(tmp_path / "llama", "llama", vocab_size=320)
    fast = save_tokenizer(path, corpus)
    cfg = tiny_config(tmp_path / "run", **{"hf.path": str(path), "data.cache_dir": str(tmp_path / "cache"),
                                          "train.steps": 4})
    trainer = Trainer(cfg)
    data = trainer.data
    assert data.vocab_size == 300 and "tokenized by" in data.describe()
    text = corpus.read_text()
    expected = fast(text, add_special_tokens=False)["input_ids"] + [fast.eos_token_id]
    got = [int(t) for s in data.train.shards + data.val_shards for t in s]
    assert got == expected  # one document: its tokens, then the end-of-sequence token
    assert len(list((tmp_path / "cache").glob("text-tok*.npy"))) == 1  # cached for the next run
    trainer.fit()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "hf_model", local_files_only=True)
    assert again("def f1(x):")["input_ids"] == fast("def f1(x):")["input_ids"]


def test_a_model_smaller_than_the_tokenizer_is_refused(tiny_config, tmp_path, corpus):
    path = save_tiny_hf(tmp_path / "llama", "llama")  # 256 ids, the tokenizer has 300
    save_tokenizer(path, corpus)
    with pytest.raises(ConfigError, match="300 token ids.*vocabulary of 256"):
        Trainer(tiny_config(tmp_path / "run", **{"hf.path": str(path)}))


def test_a_model_no_plan_can_drive(tiny_config, tmp_path, capsys):
    """Gemma 2 is not a family hetrain describes: a budget is refused before the data is read,
    naming the fix; under 'auto' it trains plainly and says why."""
    cfg = transformers.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    cfg.save_pretrained(tmp_path / "gemma2")
    hf = {"hf.path": str(tmp_path / "gemma2"), "data.path": str(tmp_path / "missing.txt")}
    with pytest.raises(ConfigError, match="model types llama.*--memory.device_budget none"):
        Trainer(tiny_config(tmp_path / "a", **hf, **{"memory.device_budget": "40%"}))
    trainer = Trainer(tiny_config(tmp_path / "b", **{"hf.path": hf["hf.path"], "memory.device_budget": "auto",
                                                     "hardware.device_kind": "cpu", "train.steps": 2}))
    assert trainer.plan is None and "training plainly under memory.device_budget auto" in capsys.readouterr().out
