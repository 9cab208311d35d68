"""Where the loop's records go: metrics.jsonl, metrics.csv, TensorBoard where installed, provenance.json."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from m3jepa.config import ConfigError
from m3jepa.core.layout import METRICS_CSV as CSV  # the run folder's names are core/layout.py's
from m3jepa.core.layout import METRICS_LOG as JSONL
from m3jepa.core.layout import TENSORBOARD
from m3jepa.core.provenance import Session
from m3jepa.eval.report import flatten
from m3jepa.files import atomic_write_text

log = logging.getLogger(__name__)



def tensorboard_installed() -> bool:
    """torch.utils.tensorboard needs the `tensorboard` package; look for it without importing it."""
    return importlib.util.find_spec("tensorboard") is not None


def use_tensorboard(mode: str) -> bool:
    """train.tensorboard: "off" never, "auto" when installed, "on" always (an error when not installed)."""
    if mode == "off":
        return False
    installed = tensorboard_installed()
    if mode == "on" and not installed:
        raise ConfigError(
            'train.tensorboard = "on" needs the tensorboard package: pip install tensorboard '
            '(or set train.tensorboard = "auto" to log to it only where it is installed)'
        )
    return installed


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a last line cut by a kill mid-write is left out."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1} is not valid JSON") from None
    return out


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """`step` first, then every other flattened key sorted: the same columns whatever order records came."""
    keys = set().union(*rows) if rows else set()
    return ["step"] + sorted(keys - {"step"})


def _cell(value: Any) -> Any:
    # a list (or None) has no CSV form of its own: JSON for a list, an empty cell for None
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list) else value


def csv_text(rows: list[dict[str, Any]], cols: list[str], header: bool = True) -> str:
    """Rows of flattened records as CSV under `cols`; a key a record lacks is an empty cell."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buf.getvalue()


def write_csv(run_dir: Path) -> list[str]:
    """Rewrite metrics.csv from metrics.jsonl (atomically): one row per record; returns its columns."""
    rows = [flatten(r) for r in read_records(Path(run_dir) / JSONL)]
    cols = columns(rows)
    atomic_write_text(Path(run_dir) / CSV, csv_text(rows, cols))
    return cols


class Tracker:
    """Rank 0's sinks for the loop's records; `log` writes one record to all of them.

    metrics.jsonl is the record of truth: metrics.csv is rewritten from it when the tracker opens (after a
    resume cut the jsonl back) and whenever a record brings a new column, so the two always agree.
    """

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool) -> None:
        self.run_dir = Path(run_dir)
        self.cols = write_csv(self.run_dir)
        self.jsonl = (self.run_dir / JSONL).open("a")
        self.csv = (self.run_dir / CSV).open("a", newline="")
        self.tb = _summary_writer(self.run_dir / TENSORBOARD, start_step) if tensorboard else None
        self.session = Session(self.run_dir, start_step)
        self.step = start_step

    def log(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        flat = flatten(record)
        if set(flat) - set(self.cols):
            self.csv.close()  # a new column: rewrite the file with the wider header (jsonl already has it)
            self.cols = write_csv(self.run_dir)
            self.csv = (self.run_dir / CSV).open("a", newline="")
        else:
            self.csv.write(csv_text([flat], self.cols, header=False))
            self.csv.flush()
        if self.tb is not None:
            _add_scalars(self.tb, flat)
        self.step = max(self.step, int(record["step"]))
        self.session.update(self.step)

    def close(self) -> None:
        """Close the sinks; called from the loop's `finally`, where an exception on its way out means the
        session did not finish (a kill never gets here: its session keeps its last update)."""
        failed = sys.exc_info()[0] is not None
        self.jsonl.close()
        self.csv.close()
        if self.tb is not None:
            self.tb.close()
        self.session.update(self.step, final=True, finished=not failed)


def _summary_writer(log_dir: Path, start_step: int) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # optional: only when train.tensorboard allows

    # A resumed run's events after its checkpoint step are dropped, as its metrics.jsonl lines are.
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)


def _add_scalars(writer: Any, flat: dict[str, Any]) -> None:
    """One scalar per numeric flattened key, its dots made slashes so TensorBoard groups them."""
    step = int(flat["step"])
    for key, value in flat.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            writer.add_scalar(key.replace(".", "/"), value, global_step=step)
    writer.flush()
