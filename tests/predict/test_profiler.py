"""Profiler: a tiny model measured on this machine, the per-machine cache, the wrong-machine error."""

import json
import os

import pytest

from hetrain.cli import main
from hetrain.config import load_config
from hetrain.errors import ConfigError
from hetrain.model.describe import describe_model
from hetrain.model.presets import get_preset
from hetrain.predict.cost import Profile
from hetrain.train.job import profile_job
from hetrain.predict.profiler import ProfileOptions, measure_collective
from hetrain.predict.profile_store import (describe_machine, load_profile, machine_fingerprint, profile_path,
                                           read_profile, require_profile, save_profile)


def _values(tmp_path) -> dict[str, str]:
    return {"model.preset": "tiny", "train.micro_batch": "2", "train.seq_len": "16", "run.threads": "2",
            "hardware.profile_dir": str(tmp_path / "profiles")}


def _args(tmp_path) -> list[str]:
    return [x for k, v in _values(tmp_path).items() for x in (f"--{k}", v)]


FAST = ProfileOptions(reps=3, warmup=1, rounds=1, collectives=False)


def test_back_to_back_timing_counts_the_same_bytes_and_keeps_the_run_s_rng(tmp_path):
    """Groups of runs issued back to back (the GPU default) measure the same saved bytes as runs
    timed one by one, and a profile leaves the caller's random stream where it was."""
    import torch

    cfg = load_config(None, _values(tmp_path))
    single = profile_job(cfg, FAST)[1]
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    grouped = profile_job(cfg, ProfileOptions(reps=3, warmup=1, rounds=1, collectives=False, back_to_back=3))[1]
    assert torch.equal(torch.rand(3), expected)
    for a, b in ((single.embedding, grouped.embedding), (single.block, grouped.block), (single.head, grouped.head)):
        assert a.act_bytes == b.act_bytes
        assert b.fwd_s > 0 and b.bwd_s > 0 and b.recompute_s > 0


def test_profile_measures_tiny_model_and_caches_it(tmp_path):
    profile, entry, path = profile_job(load_config(None, _values(tmp_path)), FAST)
    assert path == profile_path(tmp_path / "profiles", machine_fingerprint()) and path.is_file()
    assert profile.device == "cpu"
    # A CPU-only machine records what it cannot measure as absent, with the reason.
    assert profile.copy_bytes_per_s == dict.fromkeys(("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"))
    assert "no accelerator" in profile.unmeasured["copy.h2d_pinned"]
    assert "collective" in profile.unmeasured and profile.collective is None
    assert set(profile.cpu_adam_params_per_s) == set(range(1, (os.cpu_count() or 1) + 1))
    assert all(rate > 0 for rate in profile.cpu_adam_params_per_s.values())
    for update in (profile.optimizer, profile.clip, profile.grad_accumulate):
        assert update.params_per_s > 0 and update.per_tensor_s >= 0 and update.per_call_s >= 0

    assert (entry.micro_batch, entry.seq_len, entry.dtype, entry.threads) == (2, 16, "fp32", 2)
    for timing in (entry.embedding, entry.block, entry.head):
        assert timing.fwd_s > 0 and timing.bwd_s > 0 and timing.recompute_s > 0
    # Saved bytes are the accountant's count, which the description matches exactly in fp32.
    desc = describe_model(get_preset("tiny"), 2, 16, compute_dtype_bytes=4)
    assert entry.block.act_bytes == desc.blocks[0].act_bytes_total
    assert entry.embedding.act_bytes == desc.embedding.act_bytes_total
    assert entry.head.act_bytes == desc.head.act_bytes_total

    # Round trip; a second shape joins the same machine file and the first stays.
    assert read_profile(path) == profile
    cfg = load_config(None, {**_values(tmp_path), "train.seq_len": "8"})
    second, entry8, path2 = profile_job(cfg, FAST)
    assert path2 == path and len(second.models) == 2 and read_profile(path) == second
    assert second.find_model(cfg.model, 2, 8, "fp32", 2) == entry8
    assert second.find_model(cfg.model, 5, 8, "fp32", 2) == entry8   # nearest micro-batch
    assert second.find_model(cfg.model, 2, 8, "bf16", 2) is None


def test_profile_command_prints_the_table(tmp_path, capsys):
    profile_job(load_config(None, _values(tmp_path)), FAST)   # machine-level figures now cached
    assert main(["profile", "--no-collectives", *_args(tmp_path), "--train.dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "block" in out and "head+loss" in out and "dtype=bf16" in out
    assert "not measured on this machine" in out and "copy.h2d_pinned" in out
    profile = load_profile(tmp_path / "profiles")
    assert [m.dtype for m in profile.models] == ["fp32", "bf16"]


def test_profile_from_another_machine_is_refused(tmp_path):
    other = {**machine_fingerprint(), "hostname": "other-box", "cpu_model": "Imaginary CPU 9000"}
    path = save_profile(Profile(machine=other, device="cpu"), tmp_path)
    with pytest.raises(ConfigError) as err:
        read_profile(path)
    message = str(err.value)
    assert "other-box" in message and describe_machine(machine_fingerprint()) in message
    assert "re-run `hetrain profile`" in message
    # Looking for this machine's profile names the machines the folder does have.
    with pytest.raises(ConfigError, match="only holds profiles of other-box.*hetrain profile"):
        require_profile(tmp_path)
    assert load_profile(tmp_path) is None


def test_gloo_all_reduce_between_two_local_processes():
    result = measure_collective(ProfileOptions(reps=2, warmup=0))
    assert result["backend"] == "gloo" and result["world_size"] == 2
    seconds = result["seconds_by_bytes"]
    assert len(seconds) == 3 and all(s > 0 for s in seconds.values())


def test_a_hugging_face_model_is_profiled_one_block_through_the_block_interface(tmp_path, capsys):
    """The saved bytes it measures are the description's (rotary cos/sin once, with the
    embedding), the cost model and the plain predictor read its entry, and the plain
    predictor's peak is hetrain.memory's count of a real step."""
    pytest.importorskip("transformers")
    from hetrain.predict.cost import ProfileCost
    from hetrain.predict.profile_store import format_profile
    from hetrain.train.job import describe, job_cost, predict_job
    from tests_support import save_tiny_hf

    path = save_tiny_hf(tmp_path / "llama", "llama", num_hidden_layers=3)
    cfg = load_config(None, {**_values(tmp_path), "hf.path": str(path)})
    profile, entry, _ = profile_job(cfg, FAST)
    assert entry.model["hf_config"]["model_type"] == "llama"
    desc = describe(dataclasses_replace_dtype(cfg, "fp32"))
    assert [entry.embedding.act_bytes, entry.block.act_bytes, entry.head.act_bytes] == \
        [desc.embedding.act_bytes_total, desc.blocks[0].act_bytes_total, desc.head.act_bytes_total]
    assert isinstance(job_cost(cfg, profile), ProfileCost)
    assert "Hugging Face llama (one block of 3)" in format_profile(profile, entry)
    pred = predict_job(cfg, profile)
    assert pred.step_s > 0
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(3000)))
    run = {"data.source": "text", "data.path": str(corpus), "data.cache_dir": "", "train.steps": "3",
           "train.eval_every": "0", "train.log_every": "1", "log.progress": "false", "log.tensorboard": "false",
           "log.peak_flops": "1e11", "memory.device_budget": "none", "run.dir": str(tmp_path / "run")}
    from hetrain.train.trainer import Trainer

    Trainer(load_config(None, {**_values(tmp_path), "hf.path": str(path), **run})).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["peak_device_bytes"] for r in records[1:]) == pred.peak_device_bytes  # to the byte


def dataclasses_replace_dtype(cfg, dtype):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, dtype=dtype))


def test_the_matmul_line_prices_a_kind_in_cluster_plans(tmp_path):
    """A profile measures the device's GEMM line; a profile made on a kind of accelerator prices
    that kind in the roofline (the cluster planner reads hardware.profile_dir for it). A profile
    made on a CPU does not: it is the whole machine at its thread count, while a cluster file's
    cpu devices are processes whose peak the file declares."""
    from hetrain.hardware.catalog import get_kind
    from hetrain.predict.profile_store import measured_curves
    from hetrain.predict.roofline import curve_for

    profile, _, path = profile_job(load_config(None, _values(tmp_path)), FAST)
    line = profile.matmul
    assert line["dtype"] == "float32" and line["s_per_flop"] > 0 and line["overhead_s"] >= 0
    assert len(line["points"]) == 5 and all(s > 0 for _, s in line["points"])
    assert measured_curves(tmp_path / "profiles", "fp32") == {}
    # The same file as if made on an A100: that kind gets the measured curve.
    raw = json.loads(path.read_text())
    raw["device"] = "NVIDIA A100-SXM4-40GB"
    (tmp_path / "profiles" / "profile-a100.json").write_text(json.dumps(raw))
    a100 = get_kind("a100-40gb")
    curve = measured_curves(tmp_path / "profiles", "fp32")[a100.name]
    assert curve == curve_for(a100, line, "fp32")
    assert curve.max_efficiency == pytest.approx(min(1.0, 1 / (line["s_per_flop"] * a100.peak_flops_per_s("fp32"))))
    assert curve.overhead_s == line["overhead_s"] and "measured" in curve.source
    # A GEMM priced on the measured curve takes the line's time.
    flops = 2 * 512**3
    assert curve.gemm_s(flops, a100.peak_flops_per_s("fp32")) == pytest.approx(
        flops * max(line["s_per_flop"], 1 / a100.peak_flops_per_s("fp32")) + line["overhead_s"])


def test_a_cached_profile_of_an_older_format_is_ignored_and_said_so(tmp_path, capsys):
    """Format 1 timed bf16 as autocast over fp32 weights; this hetrain times the step's bf16 copy
    (hetrain.precision). The cache is then as good as empty; a named file is refused."""
    from hetrain.errors import ConfigError
    from hetrain.predict.profile_store import load_profile, machine_fingerprint, profile_path, read_profile

    path = profile_path(tmp_path, machine_fingerprint())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": 1}')
    assert load_profile(tmp_path) is None
    assert "older hetrain" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="re-run `hetrain profile`"):
        read_profile(path)
