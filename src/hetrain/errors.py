"""Errors that hetrain reports to the user as one clear line (exit code 2), before work starts."""


class ConfigError(ValueError):
    """Bad user input: the message names what is wrong and how to fix it."""
