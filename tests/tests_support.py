"""Helpers shared by test modules (tests/ is on sys.path under pytest, so import by name)."""


def tiny_overrides(run_dir, corpus, **extra) -> dict[str, str]:
    """A tiny model on a small corpus: every trainer test runs in seconds on CPU."""
    values = {
        "run.dir": str(run_dir), "run.threads": "2", "model.preset": "tiny",
        "data.source": "text", "data.path": str(corpus), "data.cache_dir": "",
        "train.steps": "10", "train.micro_batch": "4", "train.seq_len": "32",
        "train.warmup_steps": "2", "train.eval_every": "5", "train.eval_batches": "2",
        "train.log_every": "1", "train.ckpt_every": "5", "log.progress": "false",
        "log.tensorboard": "false", "log.peak_flops": "1e11", "memory.device_budget": "none",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return values


def cli_args(run_dir, corpus, **extra) -> list[str]:
    """The same config as command-line overrides."""
    args = []
    for key, value in tiny_overrides(run_dir, corpus, **extra).items():
        args += [f"--{key}", value]
    return args
