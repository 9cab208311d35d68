"""Where a run starts: fresh or from `latest`, on one process or on nodes that share no disk.

The run folder is rank 0's (docs/multinode.md, "Checkpoints and resume"): only rank 0 writes it and only
rank 0's copy is read on resume; rank 0 sends the checkpoint to the other ranks over the process group,
so their nodes need no copy. torchrun's c10d rendezvous does not keep a node's rank from one launch to
the next (it ranks the nodes by host name), so before anything is read every rank reports the step of
its own folder's `latest`, and when another node's folder is newer than rank 0's (the run's rank 0 was
there last time) that rank sends its whole run folder to rank 0, which holds the run from then on.

A worker torchrun restarted (`--max-restarts`) reruns the same command line, without `--resume`: it
resumes from `latest` when the folder's checkpoints were written by this same launch (`launch.json`
holds the rendezvous id, TORCHELASTIC_RUN_ID), and starts again when none was written yet. A folder
left by another launch still needs `--resume`, so a failure of its own (a run already there) is not
turned into a resume by the restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from m3jepa.config import PipelineConfig
from m3jepa.core import checkpoint as ckpt
from m3jepa.core.layout import LAUNCH, LOCK, STATE, RunDir
from m3jepa.distributed import DistInfo, launch
from m3jepa.files import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folder:
    """What one rank's copy of the run folder holds: its `latest` step (None: no checkpoint; -1: one
    whose state cannot be read) and the launch that wrote it."""

    step: int | None
    launch: str | None


def plan(layout: RunDir, resume: bool, info: DistInfo) -> bool:
    """Whether the run resumes from `latest` (the same answer on every rank); raises the one-line errors
    of a run already there without --resume and of --resume without a checkpoint. Collective: every rank
    calls it. When another rank's copy of the folder is the newest, rank 0 receives it first."""
    ckpt.recover_interrupted(layout.latest)  # each rank its own copy: a kill between two renames
    run_id, restarts = launch()
    views = info.gather((_folder(layout), restarts > 0, resume))
    folders: list[Folder] = [v[0] for v in views]
    restarted = any(v[1] for v in views)  # a node restarted for another's failure counts 0
    resume = any(v[2] for v in views)  # `m3jepa run` decides from each node's own copy of the folder
    src = max(range(len(folders)), key=lambda r: (_order(folders[r].step), -r))
    have = folders[src].step is not None
    ours = have and restarted and run_id is not None and folders[src].launch == run_id
    where = layout.path if src == 0 else f"{layout.path} (on the node of rank {src})"
    if have and not (resume or ours):
        raise ValueError(f"{where} already holds a run; pass --resume to continue it, or choose another "
                         "--run")
    if resume and not have:
        raise ValueError(f"--resume: {layout.latest} does not exist; start the run without --resume")
    if restarted and not have:
        log.info("torchrun restarted the workers before the first checkpoint: starting the run again")
    elif ours and not resume:
        log.info("torchrun restarted the workers (launch %s): resuming from the last checkpoint", run_id)
    if have and src != 0 and folders[0].step != folders[src].step:
        _take_folder(layout, info, src, folders)
    return have


def record_launch(layout: RunDir, info: DistInfo) -> None:
    """Rank 0 notes the launch now writing the folder (`launch.json`), so its restarts resume."""
    run_id, _ = launch()
    if info.is_main and run_id is not None:
        atomic_write_text(layout.path / LAUNCH, json.dumps({"rdzv_id": run_id}) + "\n")


def load(cfg: PipelineConfig, layout: RunDir, info: DistInfo, device: torch.device) -> ckpt.Checkpoint:
    """`latest`, read by rank 0 and sent to the other ranks (tensors on the CPU, as a pickle names their
    device); a checkpoint rank 0 cannot read is the same error on every rank."""
    start, error = None, None
    if info.is_main:
        try:
            start = ckpt.load_checkpoint(layout.latest, with_optimizer=True,
                                         map_location="cpu" if info.enabled else device)
        except ckpt.CheckpointError as e:
            error = str(e)
    start, error = info.broadcast((start, error))
    if error is not None:
        raise ckpt.CheckpointError(error)
    ckpt.check_same_run(cfg, start.cfg, layout.path)  # the one rule of run identity (core/checkpoint.py)
    log.info("resuming %s at step %d", layout.latest, start.state.step)
    return start


def _order(step: int | None) -> int:
    return -2 if step is None else step


def _folder(layout: RunDir) -> Folder:
    latest = layout.latest
    if not latest.exists():
        return Folder(None, None)
    try:
        step = int(json.loads((latest / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        step = -1  # rank 0 reads it and names what is wrong (load)
    try:
        run_id = json.loads((layout.path / LAUNCH).read_text())["rdzv_id"]
    except (OSError, ValueError, KeyError, TypeError):
        run_id = None
    return Folder(step, run_id)


def _take_folder(layout: RunDir, info: DistInfo, src: int, folders: list[Folder]) -> None:
    """Rank `src` sends every file of its run folder (but the lock) to rank 0, which moves its own older
    copy aside (`<run>.step<N>`, never deleted) and writes the files it received."""
    files, error = None, None
    if info.rank == src:
        try:
            files = {p.relative_to(layout.path).as_posix(): p.read_bytes()
                     for p in sorted(layout.path.rglob("*")) if p.is_file() and p.name != LOCK}
        except OSError as e:
            error = f"rank {src} cannot read its copy of {layout.path} to send it to rank 0: {e}"
    files, error = info.broadcast((files, error), src=src)
    if error is not None:
        raise ValueError(error)
    if not info.is_main:
        return
    log.warning("rank 0's copy of %s is at step %s, rank %d's at step %d: rank %d's run folder (%d files) "
                "replaces it", layout.path, folders[0].step, src, folders[src].step, src, len(files))
    older = [c for c in layout.path.iterdir() if c.name != LOCK]  # rank 0 holds the lock file: it stays
    if older:
        aside = layout.path.with_name(f"{layout.path.name}.step{folders[0].step}")
        aside.mkdir(parents=True, exist_ok=True)
        for child in older:
            child.rename(aside / child.name)
        log.warning("rank 0's older copy of %s is kept in %s", layout.path, aside)
    for name, data in files.items():
        path = layout.path / Path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(data)
        tmp.replace(path)
