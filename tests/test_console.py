"""Progress in a log: plain lines with done/total, at least every 30 s, when the console is no terminal."""

import io
import re

from rich.console import Console

from fusedeploy.console import PLAIN_EVERY_S, PlainProgress, compression_progress, progress_task


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_plain_lines_start_finish_and_every_30_s():
    clock, lines = FakeClock(), []
    plain = PlainProgress(lines.append, clock=clock)
    plain.update("iteration", "blocks removed", 0, 8)
    assert lines == ["blocks removed: 0/8 (0%)  elapsed 0s  estimating"]
    clock.now += 10
    plain.update("iteration", "blocks removed", 1, 8)  # sooner than 30 s after the last line: quiet
    assert len(lines) == 1
    clock.now += 25  # 35 s since the last line, no update from the work: the heartbeat repeats the state
    plain.tick()
    assert lines[-1] == "blocks removed: 1/8 (12%)  elapsed 35s  ~4m05s left"
    clock.now += 5
    plain.tick()  # 5 s after a line: nothing
    assert len(lines) == 2
    clock.now += PLAIN_EVERY_S
    plain.update("iteration", "blocks removed", 4, 8, "MI 0.012")
    assert lines[-1] == "blocks removed: 4/8 (50%)  elapsed 1m10s  ~1m10s left  MI 0.012"
    clock.now += 1
    plain.update("iteration", "blocks removed", 8, 8)  # the end is always printed
    assert lines[-1].startswith("blocks removed: 8/8 (100%)  elapsed 1m11s  done")
    clock.now += 100
    plain.tick()  # nothing is running: no heartbeat
    assert len(lines) == 4


def test_a_step_that_starts_again_is_reported_again():
    clock, lines = FakeClock(), []
    plain = PlainProgress(lines.append, clock=clock)
    for _ in range(2):  # two iterations of one epoch each
        plain.update("epoch", "distillation epoch", 1, 1)
        clock.now += 1
    assert lines == ["distillation epoch: 1/1 (100%)  elapsed 0s  done"] * 2


def test_non_terminal_console_prints_lines_with_done_and_total():
    out = io.StringIO()
    con = Console(file=out, force_terminal=False, width=200)
    clock = FakeClock()
    with compression_progress(console_=con, clock=clock) as progress:
        for k in range(1, 4):
            progress("score", k, 3, "MI")
            clock.now += 40
        progress("iteration", 1, 2)
    with progress_task("perplexity", 5, console_=con, clock=clock) as advance:
        advance(5)
    text = out.getvalue()
    assert "\x1b[" not in text  # no bars, no colour codes
    found = re.findall(r"^(scoring candidates|blocks removed|perplexity): (\d+)/(\d+)", text, re.M)
    assert ("scoring candidates", "1", "3") in found and ("scoring candidates", "3", "3") in found
    assert ("blocks removed", "1", "2") in found and ("perplexity", "5", "5") in found
    assert all("elapsed" in line for line in text.splitlines())


def test_nothing_is_printed_before_the_first_update():
    out = io.StringIO()
    with compression_progress(console_=Console(file=out, force_terminal=False)):
        pass
    assert out.getvalue() == ""
