"""The package's error types.

Every error caused by what a user gave (a config value, a file, a flag, a table) is a
:class:`UserError`: ``str(err)`` is one line that names the field, the value and the fix, and every
console script turns it into exit code 2 (``moe_scaling.cli._common.run_cli``). Anything else that
escapes is an internal failure (exit 1).
"""

from __future__ import annotations

__all__ = ["UserError", "ConfigError", "InputError"]


class UserError(ValueError):
    """Bad user input. ``str(err)`` is one line naming what is wrong and how to fix it."""


class ConfigError(UserError):
    """A configuration value is invalid. ``str(err)`` is one line naming field, value and fix."""


class InputError(UserError):
    """Bad user input that is not a config field (a missing file, a malformed table, a flag)."""
