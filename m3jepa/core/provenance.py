"""What trained a run and when: the m3jepa source (git commit or version) and its sessions (provenance)."""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from m3jepa.core.layout import PROVENANCE as FILE
from m3jepa.files import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# A session still running (or killed) rewrites its times at most this often, so a kill loses little.
UPDATE_EVERY_S = 30.0


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _git(cwd: Path, *args: str) -> str | None:
    """A git command's stdout, or None when git is missing, fails or hangs (provenance never fails a run)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_identity(package_dir: Path = PACKAGE_DIR) -> dict[str, Any]:
    """{"commit": 40 hex or None, "dirty": bool or None, "version": m3jepa's version}.

    The commit is that of the repository the package's own files live in; an installed copy inside some
    other repository (a venv in a project folder) is not mistaken for it.
    """
    from m3jepa import __version__

    out: dict[str, Any] = {"commit": None, "dirty": None, "version": __version__}
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if not top or (Path(top) / package_dir.name).resolve() != package_dir.resolve():
        return out
    commit = _git(package_dir, "rev-parse", "HEAD")
    status = _git(package_dir, "status", "--porcelain")
    if commit and len(commit) == 40:
        out["commit"] = commit
        out["dirty"] = None if status is None else bool(status)
    return out


def read(run_dir: Path) -> dict[str, Any] | None:
    """The run's provenance.json, or None for a run trained before m3jepa wrote it (or an unreadable one)."""
    path = Path(run_dir) / FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sessions"), list) else None


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(Path(run_dir) / FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def float32_matmul_precision() -> str | None:
    """torch's float32 matmul precision in this process ("highest", or "high": TF32 on a GPU), as the
    resolved runtime set it (runtime.matmul_precision); None where torch cannot tell (its per-backend
    settings were mixed with the global one)."""
    import torch

    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


class Session:
    """One training process's entry in provenance.json: opened at start, its times updated as it runs."""

    def __init__(self, run_dir: Path, step: int) -> None:
        self.run_dir = Path(run_dir)
        self.began = time.perf_counter()
        self.written = self.began
        self.record = read(self.run_dir) or {"sessions": []}
        self.record["sessions"].append({
            "code": source_identity(), "started_at": now_iso(), "ended_at": None,
            "from_step": step, "to_step": step, "seconds": 0.0, "finished": False,
            "float32_matmul_precision": float32_matmul_precision(),
        })
        _write(self.run_dir, self.record)

    def update(self, step: int, *, final: bool = False, finished: bool = False) -> None:
        """Record the session's progress; written when `final` or UPDATE_EVERY_S have passed. `finished`:
        the process returned normally (not failed, not killed)."""
        now = time.perf_counter()
        if not final and now - self.written < UPDATE_EVERY_S:
            return
        session = self.record["sessions"][-1]
        session.update(to_step=step, seconds=round(now - self.began, 3), ended_at=now_iso())
        session["finished"] = finished
        _write(self.run_dir, self.record)
        self.written = now


def summary(run_dir: Path) -> dict[str, Any] | None:
    """The provenance a report needs: the code of the last session, when training started and last ran,
    and the seconds of all sessions (a killed session counts up to its last update)."""
    record = read(run_dir)
    if not record or not record["sessions"]:
        return None
    sessions = record["sessions"]
    codes = [s["code"] for s in sessions]
    out = {
        "code": codes[-1],
        "started_at": sessions[0]["started_at"],
        "trained_at": sessions[-1]["ended_at"] or sessions[-1]["started_at"],
        "training_seconds": round(sum(float(s.get("seconds") or 0.0) for s in sessions), 3),
        "sessions": len(sessions),
        "unfinished_sessions": sum(not s.get("finished") for s in sessions),
    }
    if any(c != codes[-1] for c in codes):  # resumed with other code: say so rather than hide it
        out["codes"] = codes
    return out
