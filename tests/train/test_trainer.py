"""The trainer against a plain PyTorch loop, resume equality, and what a run leaves behind."""

import json

import pytest
import torch
from safetensors.torch import load_file, load_model

from hetrain.data import build_data
from hetrain.model.describe import describe_model
from hetrain.model.gpt import GPT
from hetrain.train import checkpoint as ckpt
from hetrain.train.recipe import lr_at
from hetrain.train.trainer import Trainer


def plain_pytorch_losses(cfg, steps):
    """The reference: the textbook loop with the same seed, batches and hyperparameters."""
    torch.manual_seed(cfg.run.seed)
    model = GPT(cfg.model)
    data = build_data(cfg.data, cfg.run.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=True)
    losses = []
    for _ in range(steps):
        x, y = data.train.next_batch(cfg.train.micro_batch, cfg.train.seq_len)
        loss = torch.nn.functional.cross_entropy(model(x).view(-1, 256), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model


def test_trainer_equals_plain_pytorch(tiny_config):
    # Constant learning rate so the reference needs no schedule of its own.
    cfg = tiny_config(**{"train.warmup_steps": 0, "train.min_lr": 3e-3, "train.lr": 3e-3})
    result = Trainer(cfg).fit()
    ref_losses, ref_model = plain_pytorch_losses(cfg, cfg.train.steps)
    assert [result.losses[s] for s in range(1, 11)] == pytest.approx(ref_losses, rel=1e-6)
    trained = GPT(cfg.model)
    opt = torch.optim.AdamW(trained.parameters(), fused=True)
    state = ckpt.training_state(trained, opt)
    ckpt.load_checkpoint(result.checkpoint, state)
    ckpt.apply_training_state(trained, opt, state)
    for (name, p), q in zip(trained.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def _assert_same_weights(run_a, run_b):
    a, b = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_continues_the_exact_run(tiny_config, tmp_path):
    straight = Trainer(tiny_config(tmp_path / "straight")).fit()
    step5 = tmp_path / "straight" / "checkpoints" / "step_00000005"
    resumed = Trainer(tiny_config(tmp_path / "resumed", **{"run.resume": str(step5)})).fit()
    assert resumed.step == 10
    for step in range(6, 11):
        assert resumed.losses[step] == straight.losses[step], step
    _assert_same_weights(tmp_path / "straight", tmp_path / "resumed")


def test_interrupted_run_saves_and_resumes(tiny_config, tmp_path, monkeypatch):
    straight = Trainer(tiny_config(tmp_path / "straight")).fit()

    trainer = Trainer(tiny_config(tmp_path / "split"))
    serve = trainer.data.train.next_batch
    calls = {"n": 0}

    def interrupt_on_7th(*args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return serve(*args)

    monkeypatch.setattr(trainer.data.train, "next_batch", interrupt_on_7th)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "split")] == ["step_00000005", "step_00000006"]
    resumed = Trainer(tiny_config(tmp_path / "split", **{"run.resume": "auto"})).fit()
    for step in range(7, 11):
        assert resumed.losses[step] == straight.losses[step], step
    _assert_same_weights(tmp_path / "straight", tmp_path / "split")
    # metrics.jsonl holds each step once, in order, across the interruption.
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))


def test_run_leaves_config_metrics_checkpoint_export(tiny_config, tmp_path):
    cfg = tiny_config(**{"log.tensorboard": "true", "train.keep_checkpoints": 1})
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    assert (run / "config.toml").read_text().count("[train]") == 1
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "lr", "tokens_per_s", "step_s", "peak_device_bytes", "grad_norm", "mfu"):
        assert key in records[-1]
    assert records[0]["lr"] == pytest.approx(lr_at(0, cfg))
    assert records[-1]["val_loss"] is not None
    assert list(run.glob("tb/events.out.tfevents.*"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000010"]  # keep=1 removed step 5
    assert result.checkpoint == ckpt.list_checkpoints(run)[-1]
    exported = GPT(cfg.model)
    missing, unexpected = load_model(exported, run / "model.safetensors")
    assert not missing and not unexpected
    torch.testing.assert_close(exported.tok_emb.weight, exported.lm_head.weight)


def test_loss_falls(tiny_config):
    result = Trainer(tiny_config(**{"train.steps": 40, "train.eval_every": 20})).fit()
    assert result.val_losses[40] < result.val_losses[20] < 5.0


def test_peak_device_bytes_is_state_plus_activations(tiny_config, tmp_path):
    cfg = tiny_config(**{"train.steps": 3, "train.log_every": 1, "train.eval_every": 0})
    Trainer(cfg).fit()
    records = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    desc = describe_model(cfg.model, cfg.train.micro_batch, cfg.train.seq_len, compute_dtype_bytes=4)
    params_bytes = 4 * desc.total_params
    act_bytes = sum(layer.act_bytes_total for layer in desc.layers())
    # Step 1: parameters + activations, then gradients; Adam's two moments appear at the step.
    # From step 2: parameters + Adam state always, plus activations and gradients in between.
    later = records[-1]["peak_device_bytes"]
    assert 3 * params_bytes + act_bytes <= later <= 4 * params_bytes + act_bytes + 1024


def test_bf16_trains(tiny_config):
    result = Trainer(tiny_config(**{"train.dtype": "bf16", "train.steps": 4, "train.eval_every": 0})).fit()
    assert all(torch.isfinite(torch.tensor(list(result.losses.values()))))


def test_trace_records_every_block_and_changes_nothing(tiny_config, tmp_path):
    from hetrain.trace import read_chrome_trace

    plain = Trainer(tiny_config(tmp_path / "plain", **{"train.steps": 4, "train.grad_accum": 2})).fit()
    traced_cfg = tiny_config(tmp_path / "traced", **{"train.steps": 4, "train.grad_accum": 2,
                                                      "log.trace": "true", "log.trace_steps": 2,
                                                      "hardware.profile_dir": str(tmp_path / "profiles")})
    traced = Trainer(traced_cfg).fit()
    assert traced.losses == plain.losses
    events = read_chrome_trace(tmp_path / "traced" / "trace.json")
    assert {e.args["step"] for e in events} == {2, 3}
    names = [e.name for e in events if e.args["step"] == 2]
    expected = [f"{what} mb{m}" for m in (0, 1) for what in (
        "data", "fwd embedding", "fwd block.0", "fwd block.1", "fwd head",
        "bwd head", "bwd block.1", "bwd block.0", "bwd embedding")]
    assert names == expected + ["optim"]  # two micro-batches, then the update
    for a, b in zip(events, events[1:]):
        assert a.end_s <= b.start_s + 1e-9  # one lane, nothing overlaps on CPU
    assert (tmp_path / "traced" / "trace_timeline.png").read_bytes()[:4] == b"\x89PNG"
    # --trace profiled the model, so every record carries the prediction beside the measurement;
    # the peak memory prediction is exact (the same accounting), the time one depends on the machine.
    records = [json.loads(ln) for ln in (tmp_path / "traced" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["predicted_step_s"] > 0 for r in records)
    assert records[-1]["predicted_peak_device_bytes"] == records[-1]["peak_device_bytes"]
