"""Progress on stderr for long work: a live counter on a terminal, one line per task otherwise
(when asked), nothing when off. Never on stdout. Each task shows its throughput in its own unit
(samples/s, tensors/s, ...) and, while it runs, an estimate of the time left; where the display
is not a terminal (a pipeline's log) a long task writes a line every LOG_EVERY seconds."""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, TextIO

# seconds between the lines of a running task when the display is not a terminal
LOG_EVERY = 30.0


def progress_enabled(mode: str, stream: TextIO | None = None) -> bool:
    """'on', 'off', or 'auto' (a terminal, and not under CI)."""
    stream = stream or sys.stderr
    if mode == "on":
        return True
    if mode == "off":
        return False
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


def duration(seconds: float) -> str:
    """A short human duration: 42 s, 12 min, 1.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def throughput(done: int, seconds: float, unit: str) -> str:
    """Items per second (per minute when slower than one every ten seconds)."""
    if seconds <= 0 or done <= 0:
        return f"0 {unit}/s"
    rate = done / seconds
    return f"{rate:.3g} {unit}/s" if rate >= 0.1 else f"{rate * 60:.3g} {unit}/min"


class Task:
    """One counted task; `advance` as work completes, `close` when done. `unit`: what is
    counted (the throughput's unit)."""

    def __init__(
        self,
        label: str,
        total: int,
        enabled: bool,
        stream: TextIO,
        unit: str = "steps",
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.label, self.total, self.enabled, self.stream, self.unit = label, total, enabled, stream, unit
        self.clock = clock
        self.done = 0
        self.started = clock()
        self.live = enabled and bool(getattr(stream, "isatty", lambda: False)())
        self._last = self.started
        self._width = 0

    def status(self, now: float) -> str:
        """'label 120/1000 samples, 12.3 samples/s, about 71 s left'."""
        elapsed = now - self.started
        text = f"{self.label} {self.done}/{self.total} {self.unit}, {throughput(self.done, elapsed, self.unit)}"
        if 0 < self.done < self.total and elapsed > 0:
            text += f", about {duration((self.total - self.done) * elapsed / self.done)} left"
        return text

    def advance(self, count: int = 1) -> None:
        self.done += count
        if not self.enabled:
            return
        now = self.clock()
        if self.live and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            line = f"onnxprune: {self.status(now)}"
            self.stream.write("\r" + line.ljust(self._width))  # shorter lines cover the last one
            self._width = len(line)
            self.stream.flush()
        elif not self.live and now - self._last >= LOG_EVERY and self.done < self.total:
            self._last = now
            self.stream.write(f"onnxprune: {self.status(now)}\n")
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        seconds = self.clock() - self.started
        rate = throughput(self.done, seconds, self.unit)
        line = f"onnxprune: {self.label} {self.done}/{self.total} {self.unit} done in {seconds:.1f} s ({rate})"
        self.stream.write(("\r" + line.ljust(self._width) if self.live else line) + "\n")
        self.stream.flush()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    def task(self, label: str, total: int, unit: str = "steps") -> Task:
        return Task(label, total, self.enabled, self.stream, unit)
