"""The command line: the required overrides work, and every bad input is one line and exit code 2."""

import hashlib
import json

import pytest

from hetrain.cli import main
from tests_support import cli_args


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def trained_run(tmp_path, corpus):
    run = tmp_path / "run"
    assert main(["train", *cli_args(run, corpus, **{"train.steps": 4, "train.ckpt_every": 2})]) == 0
    return run


def test_train_with_required_overrides(tmp_path, corpus, capsys):
    run = tmp_path / "custom"
    assert main(["train", *cli_args(run, corpus), "--train.steps", "3", "--run.dir", str(run),
                 "--model.preset", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert 'preset = "tiny-llama"' in out  # the resolved config is printed
    assert (run / "config.toml").exists()
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_config_file_and_override_precedence(tmp_path, corpus, capsys):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[train]\nsteps = 2\nlr = 0.001\n')
    run = tmp_path / "r"
    assert main(["train", "--config", str(cfg_file), *cli_args(run, corpus, **{"train.steps": 1})]) == 0
    saved = (run / "config.toml").read_text()
    assert "steps = 1" in saved and "lr = 0.001" in saved


def test_help_prints_field_docs(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--train.steps" in out and "Optimizer steps to run" in out


BAD = [
    ({"train.stepz": "3"}, "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    ({"train.steps": "ten"}, "train.steps expects an integer, got 'ten'"),
    ({"model.preset": "gpt-5"}, "unknown model preset 'gpt-5'"),
    ({"data.path": "/nonexistent/corpus.txt"}, "does not exist"),
    ({"run.resume": "/nonexistent/ckpt"}, "checkpoint '/nonexistent/ckpt' does not exist"),
    ({"train.dtype": "fp8"}, "train.dtype must be 'fp32' or 'bf16'"),
    ({"train.ckpt_every": "-1"}, "train.ckpt_every must be 0 or more"),
    ({"train.keep_checkpoints": "-1"}, "train.keep_checkpoints must be 0 or more"),
    ({"train.lr": "-1"}, "train.lr must be positive"),
    ({"hardware.device_kind": "FOO-9000"}, "unknown device kind 'FOO-9000'"),
    ({"run.dist_timeout_s": "0"}, "run.dist_timeout_s must be positive"),
    ({"run.recompute_full_rerun": "true"}, "run.recompute_full_rerun applies to cluster runs (--plan.file)"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_is_one_line_exit_2(tmp_path, corpus, capsys, override, message):
    run = tmp_path / "run"
    assert main(["train", *cli_args(run, corpus, **override)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetrain: error: ") and message in err and "\n" not in err
    assert not run.exists()  # nothing was written


@pytest.mark.parametrize("command", ["train", "plan"])
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_a_run_dir_that_cannot_be_a_folder_is_one_line_exit_2(tmp_path, corpus, capsys, command, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = blocker if where == "file" else blocker / "run"
    args = cli_args(run, corpus, **{"hardware.device_kind": "cpu"})
    assert main([command, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hetrain: error: run.dir") and "pass a folder path to --run.dir" in err and "\n" not in err
    assert blocker.read_text() == "not a folder"


def test_estimate_refuses_an_unknown_device_kind(capsys):
    assert main(["estimate", "--hardware.device_kind", "FOO-9000"]) == 2
    assert "unknown device kind 'FOO-9000'; known kinds: V100" in capsys.readouterr().err


def test_a_short_context_preset_trains_with_the_default_sequence_length(tmp_path, corpus):
    # tiny's max_seq_len is 64, under the default seq_len of 128: the default follows the model.
    assert main(["train", "--model.preset", "tiny", "--run.dir", str(tmp_path / "r"), "--train.steps", "1",
                 "--data.source", "text", "--data.path", str(corpus), "--log.progress", "false",
                 "--log.tensorboard", "false", "--memory.device_budget", "none", "--train.micro_batch", "2"]) == 0
    assert "seq_len = 64" in (tmp_path / "r" / "config.toml").read_text()


def test_help_headings_are_sentences_not_reprs(capsys):
    assert main(["train", "--help"]) == 0
    headings = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[")]
    assert len(headings) == 9 and all("(" not in h.split("]", 1)[1][:3] for h in headings)
    assert "[data]  The training corpus and how it is read." in headings


def test_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["train", *cli_args(tmp_path / "run", empty)]) == 2
    assert "empty" in capsys.readouterr().err.lower()


def test_unknown_key_in_config_file(tmp_path, corpus, capsys):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[train]\nwarmup = 3\n")
    assert main(["train", "--config", str(cfg_file), *cli_args(tmp_path / "run", corpus)]) == 2
    assert "did you mean 'train.warmup_steps'?" in capsys.readouterr().err


def test_new_run_refuses_a_dir_with_checkpoints(trained_run, corpus, capsys):
    before = snapshot(trained_run)
    assert main(["train", *cli_args(trained_run, corpus)]) == 2
    assert "--run.resume auto" in capsys.readouterr().err
    assert snapshot(trained_run) == before


@pytest.mark.parametrize("damage", ["truncate-data", "drop-metadata", "garble-meta"])
def test_resume_from_corrupt_checkpoint(trained_run, corpus, capsys, damage):
    ckpt = trained_run / "checkpoints" / "step_00000004"
    if damage == "truncate-data":
        data_file = next(ckpt.glob("*.distcp"))
        data_file.write_bytes(data_file.read_bytes()[:100])
    elif damage == "drop-metadata":
        (ckpt / ".metadata").unlink()
    else:
        (ckpt / "meta.json").write_text("{not json")
    before = snapshot(trained_run)
    assert main(["train", *cli_args(trained_run, corpus, **{"run.resume": str(ckpt), "train.steps": 6})]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err or "could not be read" in err
    assert "--run.resume" in err
    assert snapshot(trained_run) == before


def test_resume_with_another_model_is_refused(trained_run, corpus, capsys):
    args = cli_args(trained_run, corpus, **{"run.resume": "auto", "model.n_layer": 3})
    assert main(["train", *args]) == 2
    assert "model.n_layer=2" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_configs_default_toml_is_the_default():
    from pathlib import Path

    from hetrain.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / "default.toml"
    assert load_config(str(path)) == load_config(None)


def test_plan_cluster_writes_plan_report_timeline(tmp_path, capsys):
    from pathlib import Path

    small = Path(__file__).resolve().parents[1] / "configs" / "clusters" / "mixed.toml"
    out = tmp_path / "plan"
    assert main(["plan", "--cluster", str(small), "--model.preset", "gpt2-small", "--train.seq_len", "1024",
                 "--plan.global_batch", "64", "--run.dir", str(out)]) == 0
    assert "Efficiency against the upper bound" in capsys.readouterr().out
    for name in ("plan.json", "report.txt", "timeline.png"):
        assert (out / name).stat().st_size > 0


def test_plan_without_cluster_plans_offload_for_the_budget(tmp_path, capsys):
    from hetrain.config import load_config
    from hetrain.plan.offload.plan import OffloadPlan
    from hetrain.train.offload_planning import default_cost, plain_peak_for

    args = ["--model.preset", "tiny", "--train.seq_len", "32", "--train.micro_batch", "4",
            "--hardware.device_kind", "cpu", "--run.dir", str(tmp_path / "p")]
    assert main(["plan", "--memory.device_budget", "60%"] + args) == 0
    out = capsys.readouterr().out
    assert "block.1" in out and "predicted: step" in out and "60% of the" in out
    plan = OffloadPlan.load(tmp_path / "p" / "plan.json")
    cfg = load_config(None, args[:-2])
    assert plan.device_budget_bytes == int(0.6 * plain_peak_for(cfg, default_cost(cfg)))
    assert plan.predicted_peak_device_bytes <= plan.device_budget_bytes


@pytest.mark.parametrize("budget, message", [("lots", "expects 'auto', 'none', a share such as '60%'"),
                                             ("150%", "must be in (0%, 100%]"),
                                             ("1KiB", "the smallest device budget any plan fits is")])
def test_plan_with_a_bad_or_too_small_budget_writes_nothing(tmp_path, capsys, budget, message):
    assert main(["plan", "--model.preset", "tiny", "--train.seq_len", "32", "--hardware.device_kind", "cpu",
                 "--memory.device_budget", budget, "--run.dir", str(tmp_path / "p")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
