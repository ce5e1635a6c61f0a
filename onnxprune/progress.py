"""Progress on stderr for long work: a live counter on a terminal, one line per task otherwise
(when asked), nothing when off. Never on stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO


def progress_enabled(mode: str, stream: TextIO | None = None) -> bool:
    """'on', 'off', or 'auto' (a terminal, and not under CI)."""
    stream = stream or sys.stderr
    if mode == "on":
        return True
    if mode == "off":
        return False
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class Task:
    """One counted task; `advance` as work completes, `close` when done."""

    def __init__(self, label: str, total: int, enabled: bool, stream: TextIO):
        self.label, self.total, self.enabled, self.stream = label, total, enabled, stream
        self.done = 0
        self.started = time.perf_counter()
        self.live = enabled and bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.live and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self.stream.write(f"\ronnxprune: {self.label} {self.done}/{self.total} ({now - self.started:.0f} s)")
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        seconds = time.perf_counter() - self.started
        prefix = "\r" if self.live else ""
        self.stream.write(f"{prefix}onnxprune: {self.label} {self.done}/{self.total} done in {seconds:.1f} s\n")
        self.stream.flush()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def task(self, label: str, total: int) -> Task:
        return Task(label, total, self.enabled, self.stream)
