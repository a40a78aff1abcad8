"""Deprecated alias of `treeidx.torch.baselines` (moved there; this name keeps working for now)."""

from __future__ import annotations

import warnings

from .torch.baselines import *  # noqa: F401,F403
from .torch.baselines import __all__  # noqa: F401

warnings.warn(
    "treeidx.baselines moved to treeidx.torch.baselines; import it from there", DeprecationWarning, stacklevel=2
)
