"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The handler only records the signal; the driver's loops (the pipeline loop, the wait for stages to
load) call `check_stop` at least every half second and raise `Interrupted` there, at a point where
no file is half-written and no Ray call is half-made (an exception raised inside a Ray call from a
signal handler comes out as a SystemError). A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

_received: Optional[int] = None


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived: the run stops, recording where each prompt got to."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_on_signals() -> Callable[[], None]:
    """From now on, the first SIGINT or SIGTERM makes the next `check_stop` raise `Interrupted`; a
    second one exits the process at once with code 128 + its number. Returns the function that puts
    the earlier handlers back."""
    global _received
    _received = None
    earlier = {each: signal.getsignal(each) for each in (signal.SIGINT, signal.SIGTERM)}

    def record(signum: int, frame) -> None:
        global _received
        if _received is not None:
            os._exit(128 + signum)
        _received = signum

    for each in earlier:
        signal.signal(each, record)

    def restore() -> None:
        for each, handler in earlier.items():
            signal.signal(each, handler)

    return restore


def check_stop() -> None:
    """Raises `Interrupted` if a stopping signal has arrived."""
    if _received is not None:
        raise Interrupted(_received)
