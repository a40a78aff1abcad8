"""Optional progress reporting: a tqdm bar when enabled and tqdm is installed, else a stand-in."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class _StderrBar(_NoBar):
    """Without tqdm: each postfix message on a line of its own on stderr."""

    def __init__(self, desc: str) -> None:
        self.desc = desc

    def set_postfix_str(self, s: str) -> None:
        print(f"[{self.desc}] {s}", file=sys.stderr, flush=True)


def progress_bar(enabled: bool, *, total: int | None, desc: str, unit: str = "it", echo: bool = False) -> Any:
    """A tqdm bar (update / set_postfix_str / close) when enabled and tqdm is installed.
    Otherwise a stand-in that does nothing, or, with echo=True (a few slow stages worth
    reporting anyway), prints each set_postfix_str message to stderr."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the `bench` extra)
        return _StderrBar(desc) if echo else _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, smoothing=0.05)


def stage_reporter(enabled: bool, label: str, stages: int = 3) -> Callable[[str | None], None]:
    """say(message) reports the next of `stages` stages; say(None) closes the report."""
    bar = progress_bar(enabled, total=stages, desc=label, unit="stage", echo=True)

    def say(msg: str | None) -> None:
        if msg is None:
            bar.close()
        else:
            bar.set_postfix_str(msg)
            bar.update(1)

    return say
