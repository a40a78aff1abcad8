"""Deprecated alias of `treeidx.codesearch.corpus` (moved there; this name keeps working for now)."""

from __future__ import annotations

import warnings

from .codesearch.corpus import *  # noqa: F401,F403
from .codesearch.corpus import __all__  # noqa: F401

warnings.warn(
    "treeidx.corpus moved to treeidx.codesearch.corpus; import it from there", DeprecationWarning, stacklevel=2
)
