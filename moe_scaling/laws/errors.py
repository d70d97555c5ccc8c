"""The errors of a scaling-law fit (the laws' own input error is :class:`~moe_scaling.laws.registry.LawInputError`).

Both are :class:`moe_scaling.errors.UserError`: what the user gave (a table, a flag, a fit file)
cannot give the answer asked for, ``str(err)`` is one line saying what and how to fix it, and every
console script exits 2 with it.
"""

from __future__ import annotations

from moe_scaling.errors import UserError

__all__ = ["FitError", "NoSamplesError"]


class FitError(UserError):
    """The data or the request cannot give a fit (one line saying what and how to fix it)."""


class NoSamplesError(UserError):
    """A fit without bootstrap samples (e.g. published coefficients) was asked for an interval."""
