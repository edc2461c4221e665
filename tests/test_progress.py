"""The terminal's progress: the leaders' reports (throttled, the last always sent), the board the
driver reads, and the status line kept under the log lines on a terminal and absent elsewhere."""

from __future__ import annotations

import io
import os
import logging

import cascade.progress as progress
from cascade.progress import ProgressBoard, StatusLineHandler, progress_reporter, status_line


class FakeRemote:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def remote(self, *args) -> None:
        self.calls.append(args)


class RecordingBoard:
    """Stands where a ProgressBoard actor handle goes: `board.update.remote(...)` is recorded."""

    def __init__(self) -> None:
        self.calls: list = []
        self.update = FakeRemote(self.calls)


def test_reporter_sends_at_most_every_interval_and_always_the_end(monkeypatch):
    clock = iter([0.0, 0.1, 0.2, 0.6, 0.7, 1.0, 1.05])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    board = RecordingBoard()
    report = progress_reporter(board, 4, "base")
    for done in range(1, 8):
        report(done, 7)
    # sent at t = 0 (1/7), 0.6 (4/7: 0.5 s after 0), 1.05 (7/7: the end); not 1.0 (0.4 s after 0.6)
    assert board.calls == [(4, "base", 1, 7), (4, "base", 4, 7), (4, "base", 7, 7)]


def test_board_keeps_running_calls_and_forgets_finished_ones():
    board = ProgressBoard()
    board.update(0, "tsr", 11, 11)
    board.update(1, "base", 3, 20)
    assert board.take() == {(0, "tsr"): (11, 11), (1, "base"): (3, 20)}
    assert board.take() == {(1, "base"): (3, 20)}


def test_status_line_lists_running_calls_oldest_prompt_first():
    latest = {(2, "base"): (12, 20), (1, "tsr"): (4, 11), (0, "ssr"): (25, 25)}
    assert status_line(latest) == "prompt 1 tsr 4/11 · prompt 2 base 12/20"
    assert status_line({}) == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def logger_to(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"test_progress.{id(handler)}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger


def test_status_line_stays_under_log_lines_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress.shutil, "get_terminal_size", lambda: os.terminal_size((30, 24)))
    stream = Terminal()
    handler = StatusLineHandler(stream)
    log = logger_to(handler)
    handler.show("prompt 0 base 3/20")
    log.info("prompt 0: base done")
    handler.show("prompt 0 tsr 1/11 · prompt 1 base 2/20")  # longer than 29 columns: cut
    handler.show("")
    erase = "\r\x1b[2K"
    assert stream.getvalue() == (
        "prompt 0 base 3/20" + erase + "prompt 0: base done\n" + "prompt 0 base 3/20"
        + erase + "prompt 0 tsr 1/11 · prompt 1 " + erase
    )


def test_no_status_line_off_a_terminal():
    stream = io.StringIO()
    handler = StatusLineHandler(stream)
    log = logger_to(handler)
    handler.show("prompt 0 base 3/20")
    log.info("prompt 0: base done")
    assert stream.getvalue() == "prompt 0: base done\n"
