"""Progress of encode and train: a tqdm bar on a terminal, one summary line per interval anywhere else."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

# Not a terminal (a log file, a pipe, a batch job's output): a line each time another 10% of the total is
# done, or 30 s after the previous line if that comes first, and one at the end. A bar would instead
# redraw itself with a carriage return a few times a second, every redraw kept in the log.
STEP_FRACTION = 0.1
INTERVAL_S = 30.0


def progress(
    total: int,
    *,
    desc: str,
    unit: str,
    initial: int = 0,
    disable: bool = False,
    stream: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """A progress counter with tqdm's `update`, `set_postfix` and `close` (and `with`) for `total` units.

    A tqdm bar when `stream` (default stderr) is a terminal, else a `LineProgress`.
    """
    stream = sys.stderr if stream is None else stream
    if _isatty(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True)
    return LineProgress(total, desc=desc, unit=unit, initial=initial, disable=disable, stream=stream,
                        clock=clock)


# huggingface_hub's switch for its own tqdm bars, which transformers' bars ("Loading weights") follow too;
# both read it when they are imported.
HF_BARS_OFF = "HF_HUB_DISABLE_PROGRESS_BARS"


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Off a terminal, turn off the bars of huggingface_hub and transformers (set before they are imported)
    so a log holds lines, not `Loading weights: 0%|...|` redraws; an explicit setting wins."""
    if not _isatty(sys.stderr if stream is None else stream):
        os.environ.setdefault(HF_BARS_OFF, "1")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's counting interface that writes a line per 10% of `total` or per 30 s, and one at close."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, disable: bool = False,
                 stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit, self.n, self.disable = total, desc, unit, initial, disable
        self._stream, self._clock = stream, clock
        self._start_n, self._began = initial, clock()
        self._last_n, self._last_t = initial, self._began
        self._postfix = ""
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable or self.n == self._last_n:
            return
        now = self._clock()
        if self._step(self.n) > self._step(self._last_n) or now - self._last_t >= INTERVAL_S:
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._last_n:
            self._write(self._clock())

    def _step(self, n: int) -> int:
        return int(n / (self.total * STEP_FRACTION)) if self.total > 0 else 0

    def _write(self, now: float) -> None:
        elapsed = now - self._began
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        line = (f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.1f} {self.unit}/s, "
                f"{elapsed:.0f} s" + (f", {self._postfix}" if self._postfix else ""))
        self._stream.write(line + "\n")
        self._stream.flush()
        self._last_n, self._last_t = self.n, now

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
