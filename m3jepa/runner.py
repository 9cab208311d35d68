"""`m3jepa run`: the three stages in one command, joined by files (stores, then a run directory)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from m3jepa.config import PipelineConfig

log = logging.getLogger(__name__)


def resolve_paths(cfg: PipelineConfig, workdir: Path | None) -> PipelineConfig:
    """Anchor relative store and run paths at `workdir` (default: the current directory)."""
    from m3jepa.location import location
    from m3jepa.train.loop import run_dir_of

    if workdir is None:
        return cfg
    store_root = location(cfg.encode.store_root)  # a URL is absolute already
    run_dir = run_dir_of(cfg)
    return dataclasses.replace(
        cfg,
        encode=dataclasses.replace(
            cfg.encode,
            store_root=str(store_root if store_root.is_absolute() else workdir / store_root),
        ),
        run_dir=str(run_dir if run_dir.is_absolute() else workdir / run_dir),
    )


def encode_config_for_run(cfg: PipelineConfig) -> PipelineConfig:
    """The encode step a pipeline needs: the splits it uses and its directions' modalities."""
    from m3jepa.core.directions import direction_modalities

    splits = list(dict.fromkeys([cfg.train.train_split, cfg.train.val_split, cfg.eval.split]))
    modalities = direction_modalities(cfg.train.directions)
    return dataclasses.replace(
        cfg, encode=dataclasses.replace(cfg.encode, splits=splits, modalities=modalities)
    )


def check_existing_run(cfg: PipelineConfig, run_dir: Path) -> bool:
    """Whether `run_dir` already holds a run (to resume); one of another config is refused with the fix
    (m3jepa.core.checkpoint.check_same_run, the one rule of run identity)."""
    from m3jepa.config import load_pipeline
    from m3jepa.core import checkpoint as ckpt
    from m3jepa.core.layout import RunDir

    latest = RunDir(run_dir).latest
    ckpt.recover_interrupted(latest)
    if not (latest / ckpt.CONFIG).is_file():
        return latest.exists()  # a damaged checkpoint: train's load names the missing file
    try:
        saved = load_pipeline(latest / ckpt.CONFIG, written_by_m3jepa=True)
    except ValueError as e:
        raise ckpt.CheckpointError(f"checkpoint {latest}: its config.toml cannot be read ({e})") from e
    ckpt.check_same_run(cfg, saved, run_dir)
    return True


def run_all(cfg: PipelineConfig, workdir: Path | None = None) -> str:
    """Encode (cached stores are reused), train (an existing run is resumed), evaluate; return the table."""
    from m3jepa.encode.runner import run_encode
    from m3jepa.eval.evaluate import evaluate_run
    from m3jepa.train.loop import run_dir_of, train

    cfg = encode_config_for_run(resolve_paths(cfg, workdir))
    run_dir = run_dir_of(cfg)
    resume = check_existing_run(cfg, run_dir)  # before any encoding: another config's run is refused
    summary = run_encode(cfg.encode)
    log.info("stage 1 done:\n%s", summary.table())
    if resume:
        log.info("run %s exists with this config: resuming it (it finishes at once if it is complete)",
                 run_dir)
    result = train(cfg, resume=resume)
    log.info("stage 2 done: %s", result.summary())
    metrics = evaluate_run(run_dir)
    return f"{result.summary()}\n\n{metrics.table()}"


def seed_configs(cfg: PipelineConfig, seeds: list[int] | None) -> list[PipelineConfig]:
    """One config per seed: train.seed = s in the run folder `<run>-seed<s>` (`--seeds`); [cfg] for None."""
    from m3jepa.train.loop import run_dir_of

    if seeds is None:
        return [cfg]
    base = run_dir_of(cfg)
    return [dataclasses.replace(cfg, run_dir=str(base.with_name(f"{base.name}-seed{s}")),
                                train=dataclasses.replace(cfg.train, seed=s)) for s in seeds]


def run_seeds(cfg: PipelineConfig, seeds: list[int] | None, workdir: Path | None = None) -> str:
    """`m3jepa run` once per seed (the stores are encoded once), then, for several seeds, the comparison
    of their runs as one config: mean ± std over the seeds and the chance level (`m3jepa compare`)."""
    from m3jepa.eval.compare import compare_runs, markdown
    from m3jepa.train.loop import run_dir_of

    configs = seed_configs(cfg, seeds)
    parts = [run_all(one, workdir=workdir) for one in configs]
    if len(configs) == 1:
        return parts[0]
    dirs = [run_dir_of(resolve_paths(one, workdir)) for one in configs]
    return "\n\n".join(parts + [f"{len(dirs)} seeds of one config:\n\n" + markdown(compare_runs(dirs))])
