"""Stage progress on the driver's terminal, one clean line per stage and prompt.

Each stage's leader sends its progress (steps, frame pairs, frames done of total) to a small actor,
the `ProgressBoard`, at most a few times a second; the driver takes the latest figures while it
waits for stages and shows them on one status line at the bottom of a terminal, rewritten in place:

    prompt 2 base 12/20 · prompt 1 tsr 4/11 · prompt 0 ssr 20/25

Log lines (a stage done, a video written) are printed above it, so the scrollback holds exactly
one line per stage and prompt. Where stderr is not a terminal (a log file, CI) only the log lines
are written: no bar fragments, no carriage returns.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from typing import Callable, Optional, TextIO

REPORT_INTERVAL_S = 0.5  # a leader sends its progress at most this often (and always when done)


class ProgressBoard:
    """The latest (done, total) of every running stage call, keyed by (prompt index, stage). Runs as a
    Ray actor named `cascade-progress` that needs no CPU; the leaders call `update`, the driver `take`."""

    def __init__(self) -> None:
        self.latest: dict[tuple[int, str], tuple[int, int]] = {}

    def update(self, prompt_index: int, stage: str, done: int, total: int) -> None:
        self.latest[(prompt_index, stage)] = (done, total)

    def take(self) -> dict[tuple[int, str], tuple[int, int]]:
        """Every call's latest figures, forgetting those that finished."""
        latest = dict(self.latest)
        self.latest = {key: value for key, value in latest.items() if value[0] < value[1]}
        return latest


def progress_reporter(board, prompt_index: int, stage: str) -> Callable[[int, int], None]:
    """The `progress(done, total)` callback a stage calls, sending to `board` at most every
    `REPORT_INTERVAL_S` seconds and always at the end; fire and forget."""
    last_sent = -math.inf  # the first report goes at once

    def progress(done: int, total: int) -> None:
        nonlocal last_sent
        now = time.monotonic()
        if done >= total or now - last_sent >= REPORT_INTERVAL_S:
            board.update.remote(prompt_index, stage, done, total)
            last_sent = now

    return progress


def status_line(latest: dict[tuple[int, str], tuple[int, int]]) -> str:
    """The running calls, oldest prompt first: 'prompt 2 base 12/20 · prompt 1 tsr 4/11'."""
    running = sorted((key, value) for key, value in latest.items() if value[0] < value[1])
    return " · ".join(f"prompt {index} {stage} {done}/{total}" for (index, stage), (done, total) in running)


class StatusLineHandler(logging.StreamHandler):
    """A logging handler that keeps one status line under the log lines on a terminal, and writes
    plain log lines anywhere else."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        super().__init__(stream)
        self.status = ""
        isatty = getattr(self.stream, "isatty", None)
        self.on_terminal = bool(isatty and isatty())

    def _clear(self) -> None:
        if self.status:
            self.stream.write("\r\x1b[2K")  # back to the line's start, erase it

    def emit(self, record: logging.LogRecord) -> None:
        self._clear()
        super().emit(record)
        if self.status:
            self.stream.write(self.status)
            self.flush()

    def show(self, status: str) -> None:
        """Replaces the status line (an empty string removes it); does nothing off a terminal."""
        if not self.on_terminal:
            return
        status = status[: shutil.get_terminal_size().columns - 1]  # a wrapped line could not be erased
        if status == self.status:
            return
        self._clear()
        self.status = status
        self.stream.write(status)
        self.flush()
