"""Errors for bad input, found before any compute. The CLI prints them as one line
(`hvdscale CMD: error: ...`) and exits 2 on every rank."""
from hvdscale.cli import UsageError


class ConfigError(UsageError):
    """A recipe, option or layout that cannot work (unknown key, bad value, impossible layout)."""


class DataError(UsageError):
    """Input data that is missing, truncated or not in the expected format."""
