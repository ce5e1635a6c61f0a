"""Progress lines: throughput in the task's unit, the time left while it runs, periodic lines
where the display is not a terminal, nothing when off."""

from __future__ import annotations

import io

from onnxprune.progress import LOG_EVERY, Task, duration, throughput


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_durations_and_rates_by_hand():
    assert [duration(s) for s in (42, 160, 3 * 3600)] == ["42 s", "3 min", "3.0 h"]
    assert throughput(30, 10.0, "samples") == "3 samples/s"
    assert throughput(2, 40.0, "tensors") == "3 tensors/min"  # 0.05/s reads better per minute
    assert throughput(0, 5.0, "steps") == "0 steps/s"


def test_a_log_gets_a_line_every_interval_with_rate_and_time_left_and_a_closing_rate():
    clock, log = Clock(), io.StringIO()
    task = Task("gradients, step 1", 10, True, log, "samples", clock)
    clock.now += 5
    task.advance(1)
    assert log.getvalue() == ""  # not yet LOG_EVERY seconds
    clock.now += LOG_EVERY + 5  # 40 s in, 2 of 10 done: 8 more at 20 s each
    task.advance(1)
    assert log.getvalue() == "onnxprune: gradients, step 1 2/10 samples, 3 samples/min, about 3 min left\n"
    clock.now += 10
    task.advance(8)  # finished: the closing line says the rest
    task.close()
    assert (
        log.getvalue().splitlines()[-1] == "onnxprune: gradients, step 1 10/10 samples done in 50.0 s (0.2 samples/s)"
    )
    assert len(log.getvalue().splitlines()) == 2


def test_a_terminal_line_is_rewritten_in_place_and_a_shorter_one_covers_the_last():
    clock, screen = Clock(), Terminal()
    task = Task("scores", 1000, True, screen, "tensors", clock)
    clock.now += 1
    task.advance(1)
    first = screen.getvalue()
    assert first == "\ronnxprune: scores 1/1000 tensors, 1 tensors/s, about 17 min left"
    clock.now += 999
    task.advance(999)
    last = screen.getvalue()[len(first) :]
    assert last.startswith("\ronnxprune: scores 1000/1000 tensors, 1 tensors/s") and "left" not in last
    assert len(last) == len(first)  # padded over the longer line before it
    task.close()
    assert screen.getvalue().endswith("done in 1000.0 s (1 tensors/s)\n")


def test_off_writes_nothing():
    clock, log = Clock(), Terminal()
    task = Task("x", 3, False, log, "samples", clock)
    clock.now += 100
    task.advance(3)
    task.close()
    assert log.getvalue() == ""
