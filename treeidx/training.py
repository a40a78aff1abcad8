"""Deprecated alias of `treeidx.codesearch.training` (moved there; this name keeps working for now)."""

from __future__ import annotations

import warnings

from .codesearch.training import *  # noqa: F401,F403
from .codesearch.training import __all__  # noqa: F401

warnings.warn(
    "treeidx.training moved to treeidx.codesearch.training; import it from there", DeprecationWarning, stacklevel=2
)
