"""Errors that hetrain reports to the user as one clear line: ConfigError (exit code 2) before
work starts, RankLost (exit code 1) when a distributed job loses a rank."""


class ConfigError(ValueError):
    """Bad user input: the message names what is wrong and how to fix it."""


class RankLost(RuntimeError):
    """A distributed job stopped because a rank died, hung or failed: the message names the
    ranks that did not answer (when they can be found) and where the run can resume from."""
