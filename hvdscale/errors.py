"""Errors for bad input, found before any compute. The CLI prints them as one line
(`hvdscale CMD: error: ...`) and exits 2 on every rank."""
from hvdscale.cli import UsageError


class ConfigError(UsageError):
    """A recipe, option or layout that cannot work (unknown key, bad value, impossible layout)."""


class DataError(UsageError):
    """Input data that is missing, truncated or not in the expected format."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss and the fault policy says abort (not a usage error:
    the recipe was valid, the run diverged)."""
