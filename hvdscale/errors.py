"""The errors hvdscale raises for bad input. This module imports nothing from hvdscale, so any
layer (core, adapters, engine, commands) can raise them without depending on the CLI.

Messages name the setting at fault (`optimizer.base_lr: must be > 0`, `checkpoint: ...`); the
CLI prints them as one line (`hvdscale CMD: error: ...`) and exits 2 on every rank, adding
the command-line flag where one is involved.
"""
import reprlib

SHOWN_CHARS = 60       # the most of a user's value an error message repeats

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring = 3, 6, 6, SHOWN_CHARS


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for a message, never more than a short prefix: nested or shared values
    (YAML aliases) are abbreviated by reprlib without being expanded."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class HvdscaleError(Exception):
    """Base of every error hvdscale raises on purpose."""


class UsageError(HvdscaleError, ValueError):
    """Bad input found before or during set-up: printed as one line, exit code 2.

    `setting` names the recipe key or input at fault ("checkpoint", "optimizer.base_lr");
    a command that reads that input from a flag maps it (commands' SETTING_FLAGS), and the
    CLI puts the flag in front of the message."""

    def __init__(self, message: str = "", *, setting: "str | None" = None):
        super().__init__(message)
        self.setting = setting


class ConfigError(UsageError):
    """A recipe, option or layout that cannot work (unknown key, bad value, impossible layout)."""


class DataError(UsageError):
    """Input data that is missing, truncated or not in the expected format."""


class NonFiniteLossError(HvdscaleError, RuntimeError):
    """Training produced a NaN/inf loss and the fault policy says abort (not a usage error:
    the recipe was valid, the run diverged)."""
