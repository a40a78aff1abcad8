"""Deprecated alias of `treeidx.codesearch.encoder` (moved there; this name keeps working for now)."""

from __future__ import annotations

import warnings

from .codesearch.encoder import *  # noqa: F401,F403
from .codesearch.encoder import __all__  # noqa: F401

warnings.warn(
    "treeidx.encoder moved to treeidx.codesearch.encoder; import it from there", DeprecationWarning, stacklevel=2
)
