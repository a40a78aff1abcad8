"""An optional tqdm progress bar: a no-op stand-in when disabled or tqdm is missing."""
from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar (update / set_postfix_str / close) when enabled and tqdm is installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the `bench` extra)
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, smoothing=0.05)
