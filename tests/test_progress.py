"""Progress: a tqdm bar on a terminal, one line per 10% or 30 s when stderr is a log file or a pipe."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from tqdm import tqdm

from m3jepa.progress import LineProgress, progress

ROOT = Path(__file__).resolve().parents[1]


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar():
    bar = progress(10, desc="train", unit="step", stream=_Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_log_gets_one_line_per_tenth_and_one_at_close():
    out, clock = io.StringIO(), _Clock()
    with progress(100, desc="val/image", unit="row", stream=out, clock=clock) as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(25):  # 4 rows a second, in updates of 4 rows
            clock.t += 1.0
            bar.update(4)
        bar.set_postfix(loss="0.5")
        clock.t += 1.0
        bar.update(0)
    lines = out.getvalue().splitlines()
    # 4 rows per update cross 10%, 20%, ... at 12, 20, 32, 40, 52, 60, 72, 80, 92 and 100 rows
    assert [int(re.match(r"val/image: (\d+)/100 row", s).group(1)) for s in lines] == [
        12, 20, 32, 40, 52, 60, 72, 80, 92, 100
    ]
    assert lines[0] == "val/image: 12/100 row (12%), 4.0 row/s, 3 s"
    assert "\r" not in out.getvalue()


def test_a_slow_run_gets_a_line_every_30_seconds_and_the_close_line():
    out, clock = io.StringIO(), _Clock()
    bar = progress(1000, desc="train", unit="step", initial=500, stream=out, clock=clock)
    for _ in range(7):  # one step per 10 s: 10% is 100 steps away, so time decides
        clock.t += 10.0
        bar.update(1)
    bar.set_postfix(loss="0.1234", lr="3.00e-04")
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert out.getvalue().splitlines() == [
        "train: 503/1000 step (50%), 0.1 step/s, 30 s",
        "train: 506/1000 step (51%), 0.1 step/s, 60 s",
        "train: 507/1000 step (51%), 0.1 step/s, 70 s, loss=0.1234, lr=3.00e-04",
    ]


def test_a_disabled_counter_writes_nothing():
    out = io.StringIO()
    with progress(10, desc="train", unit="step", disable=True, stream=out) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_every_progress_bar_goes_through_the_helper():
    users = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "m3jepa").rglob("*.py")
        if "tqdm" in p.read_text() and p.name != "progress.py"
    )
    assert users == [], f"route these through m3jepa.progress.progress: {users}"


def test_library_bars_are_off_in_a_log_and_left_alone_on_a_terminal(monkeypatch):
    from m3jepa.progress import HF_BARS_OFF, quiet_library_bars

    monkeypatch.delenv(HF_BARS_OFF, raising=False)
    quiet_library_bars(_Tty())
    assert HF_BARS_OFF not in os.environ
    quiet_library_bars(io.StringIO())  # a log file or a pipe
    assert os.environ[HF_BARS_OFF] == "1"
    monkeypatch.setenv(HF_BARS_OFF, "0")  # an explicit setting wins
    quiet_library_bars(io.StringIO())
    assert os.environ[HF_BARS_OFF] == "0"
