"""Command line: `hetrain train`, `hetrain estimate`, and the planning commands.

Every command takes `--config FILE.toml` and `--section.key value` overrides (see
`hetrain COMMAND --help`). Bad input is one line on stderr and exit code 2, before any work
starts. This module parses arguments and dispatches; the work lives in the packages.
"""

from __future__ import annotations

import sys

from hetrain.config import format_config, format_help, load_config
from hetrain.errors import ConfigError

USAGE = """usage: hetrain COMMAND [--config FILE.toml] [--section.key VALUE ...]

commands:
  train      train a model (default: the 'small' preset on the Python standard library source)
  estimate   memory and step-time breakdown for a model and batch, without training

`hetrain COMMAND --help` lists every config key with its default and meaning."""


def _split_config(args: list[str]) -> tuple[str | None, list[str]]:
    path, rest, i = None, [], 0
    while i < len(args):
        if args[i] == "--config":
            if i + 1 >= len(args):
                raise ConfigError("--config needs a TOML file path, e.g. --config configs/default.toml")
            path, i = args[i + 1], i + 2
        elif args[i].startswith("--config="):
            path, i = args[i].split("=", 1)[1], i + 1
        else:
            rest.append(args[i])
            i += 1
    return path, rest


def cmd_train(args: list[str]) -> int:
    from hetrain.train.trainer import Trainer

    path, overrides = _split_config(args)
    cfg = load_config(path, overrides)
    print(format_config(cfg), flush=True)
    trainer = Trainer(cfg)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_estimate(args: list[str]) -> int:
    from hetrain.estimate import estimate_report

    path, overrides = _split_config(args)
    print(estimate_report(load_config(path, overrides)))
    return 0


COMMANDS = {"train": cmd_train, "estimate": cmd_estimate}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hetrain: error: unknown command '{command}'; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if "-h" in args or "--help" in args:
        print(USAGE.splitlines()[0] + "\n")
        print(format_help())
        return 0
    try:
        return COMMANDS[command](args)
    except ConfigError as e:
        print(f"hetrain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
