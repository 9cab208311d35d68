"""The `m3jepa` command line: encode, stores, train-predictor, evaluate, run, lora-export.

Every command imports its stage lazily, so `m3jepa evaluate` never loads encoder code, and
logging is configured here only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from m3jepa.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
stores_app = typer.Typer(no_args_is_help=True, help="List, inspect and verify feature stores.")
app.add_typer(stores_app, name="stores")

log = logging.getLogger("m3jepa")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")]
Device = Annotated[
    str | None, typer.Option(help="runtime.device: auto | cpu | cuda | cuda:N (default: the config's).")
]
Precision = Annotated[
    str | None, typer.Option(help="runtime.precision: fp32 | bf16 (float32 master weights; bf16 autocast).")
]


@app.command()
def encode(
    dataset: Annotated[str, typer.Option(help="tuxpaint | coco | flickr30k | jsonl")] = "tuxpaint",
    root: Annotated[str | None, typer.Option(help="Dataset root (default: the dataset's own).")] = None,
    split: Annotated[str, typer.Option(help="Comma-separated splits, or 'all'.")] = "all",
    modality: Annotated[str, typer.Option(help="Comma-separated modalities, or 'all'.")] = "image,text",
    image_encoder: Annotated[str | None, typer.Option(help="Registry name (default per dataset).")] = None,
    text_encoder: Annotated[str | None, typer.Option(help="Registry name (default per dataset).")] = None,
    audio_encoder: Annotated[str | None, typer.Option(help="Registry name (default per dataset).")] = None,
    label_encoder: Annotated[str | None, typer.Option(help="Registry name (default per dataset).")] = None,
    store_root: Annotated[str, typer.Option(help="Where stores are written.")] = "stores",
    format: Annotated[str, typer.Option("--format", help="zarr | hdf5")] = "zarr",
    kind: Annotated[str, typer.Option(help="pooled | tokens | prefix (see docs/lora.md)")] = "pooled",
    tunable_layers: Annotated[
        int, typer.Option(help="--kind prefix: store the states entering the last N encoder layers.")
    ] = 3,
    dtype: Annotated[str, typer.Option(help="float16 | float32")] = "float16",
    batch_size: Annotated[int, typer.Option(help="Rows per encoder batch.")] = 64,
    workers: Annotated[int, typer.Option(help="Decoding worker processes.")] = 2,
    decode_priority: Annotated[
        str, typer.Option(help="auto | low | normal: the decoding workers' CPU priority (auto: low on CPU).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    shard_size: Annotated[int, typer.Option(help="Rows per shard (the unit of resume).")] = 2048,
    limit: Annotated[int | None, typer.Option(help="Keep the first N groups of each split.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the dataset's split.")] = 0,
    skip_bad: Annotated[bool, typer.Option(help="Skip bad items and list them in the manifest.")] = False,
    threads: Annotated[int | None, typer.Option(help="Torch threads per process (default: torch's).")] = None,
    content_hash: Annotated[
        str, typer.Option(help="stat | sha256: how media files are fingerprinted to find stale stores.")
    ] = "stat",
    force: Annotated[
        bool, typer.Option(help="Re-encode the requested stores from scratch (stale ones too).")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Run the frozen encoders once and write feature stores (resumable; torchrun shares shards)."""
    _setup_logging(verbose)
    from m3jepa.config import EncodeConfig

    with _errors():
        cfg = EncodeConfig(
            dataset=dataset,
            root=root,
            splits=_csv(split) or ["all"],
            modalities=_csv(modality) or ["all"],
            image_encoder=image_encoder,
            text_encoder=text_encoder,
            audio_encoder=audio_encoder,
            label_encoder=label_encoder,
            store_root=store_root,
            format=format,
            kind=kind,
            tunable_layers=tunable_layers,
            dtype=dtype,
            batch_size=batch_size,
            workers=workers,
            decode_priority=decode_priority,
            device=device,
            shard_size=shard_size,
            limit=limit,
            seed=seed,
            skip_bad=skip_bad,
            threads=threads,
            content_hash=content_hash,
            force=force,
        )
        from m3jepa.encode.runner import run_encode

        summary = run_encode(cfg)
        typer.echo(summary.table())


@stores_app.command("list")
def stores_list(
    store_root: Annotated[str, typer.Argument(help="Store root to scan.")] = "stores",
    verbose: Verbose = False,
) -> None:
    """List the stores under a root with their row counts and encoders."""
    _setup_logging(verbose)
    from m3jepa.store.cli_views import list_view

    with _errors():
        typer.echo(list_view(Path(store_root)))


@stores_app.command("inspect")
def stores_inspect(path: Annotated[str, typer.Argument(help="A store directory.")], verbose: Verbose = False):
    """Print a store's manifest summary."""
    _setup_logging(verbose)
    from m3jepa.store.cli_views import inspect_view

    with _errors():
        typer.echo(inspect_view(Path(path)))


@stores_app.command("verify")
def stores_verify(
    path: Annotated[str, typer.Argument(help="A store directory.")],
    dataset: Annotated[
        str | None, typer.Option(help="Also check staleness against this dataset (default: the store's).")
    ] = None,
    root: Annotated[
        str | None, typer.Option(help="Also check staleness against the dataset in this folder.")
    ] = None,
    seed: Annotated[int, typer.Option(help="With --dataset/--root: the split seed it was encoded with.")] = 0,
    limit: Annotated[
        int | None, typer.Option(help="With --dataset/--root: the --limit it was encoded with.")
    ] = None,
    verbose: Verbose = False,
):
    """Check a store's checksums and row counts, and with --dataset/--root whether it is stale; exit status 1
    on a corrupt or stale store."""
    _setup_logging(verbose)
    from m3jepa.store.verify import verify_store

    with _errors():
        report = verify_store(Path(path))
        if (dataset or root) and report.ok:  # a corrupt store is not judged against its dataset
            from m3jepa.encode.source import check_source

            check_source(report, dataset, root, seed, limit)
        typer.echo(report.text())
        if not report.ok:
            raise typer.Exit(1)


@app.command("train-predictor")
def train_predictor(
    pipeline: Annotated[str | None, typer.Option(help="A TOML pipeline file.")] = None,
    store_root: Annotated[str | None, typer.Option(help="Overrides encode.store_root.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Overrides encode.dataset.")] = None,
    run: Annotated[str | None, typer.Option(help="Run directory (default runs/<name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
    device: Device = None,
    precision: Precision = None,
    set_: Sets = None,
    verbose: Verbose = False,
) -> None:
    """Train the predictor from cached feature stores (never runs an encoder)."""
    _setup_logging(verbose)
    with _errors():
        cfg = _pipeline(pipeline, set_, store_root=store_root, dataset=dataset, run=run, device=device,
                        precision=precision)
        from m3jepa.train.loop import train

        result = train(cfg, resume=resume)
        typer.echo(result.summary())


@app.command()
def evaluate(
    run: Annotated[str, typer.Option(help="A run directory written by train-predictor.")],
    split: Annotated[str | None, typer.Option(help="Split to score (default: eval.split).")] = None,
    protocol: Annotated[str | None, typer.Option(help="multi | paired")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    json_: Annotated[bool, typer.Option("--json", help="Print the metrics JSON on stdout.")] = False,
    device: Device = None,
    precision: Precision = None,
    verbose: Verbose = False,
) -> None:
    """Score a trained run: retrieval R@1/5/10 both ways, gallery sizes, query latency."""
    _setup_logging(verbose)
    with _errors():
        _check_options("eval", {"split": split, "protocol": protocol})
        _check_options("runtime", {"device": device, "precision": precision})
        _check_checkpoint(checkpoint)
        from m3jepa.eval.evaluate import evaluate_run

        metrics = evaluate_run(
            Path(run), split=split, protocol=protocol, checkpoint=checkpoint, device=device,
            precision=precision,
        )
        typer.echo(json.dumps(metrics.to_json(), indent=2) if json_ else metrics.table())


@app.command("lora-export")
def lora_export(
    run: Annotated[str, typer.Option(help="A LoRA run directory written by train-predictor.")],
    out: Annotated[str, typer.Option(help="Where to write one folder per tuned modality.")],
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    merge: Annotated[
        bool, typer.Option(help="Merge the adapters into the tail layers' weights instead of copying them.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Export a LoRA run's adapters (peft format), or the tail layers with the adapters merged in."""
    _setup_logging(verbose)
    with _errors():
        _check_checkpoint(checkpoint)
        from m3jepa.lora.export import export_lora

        for path in export_lora(Path(run), Path(out), checkpoint=checkpoint, merge=merge):
            typer.echo(str(path))


@app.command("model-info")
def model_info(
    pipeline: Annotated[str | None, typer.Option(help="A TOML pipeline (default: the paper preset).")] = None,
    dims: Annotated[
        str, typer.Option(help="Latent dims, e.g. image=1024,text=4096.")
    ] = "image=1024,text=4096",
    set_: Sets = None,
) -> None:
    """Print the predictor's parameter count per part (the paper preset by default: 140.6M)."""
    with _errors():
        import torch

        from m3jepa.model import build_predictor
        from m3jepa.model.predictor import count_parameters, paper_preset, parameter_breakdown

        cfg = _pipeline(pipeline, set_).model if pipeline or set_ else paper_preset()
        sizes = {k.strip(): int(v) for k, v in (item.split("=") for item in dims.split(","))}
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = build_predictor(cfg, sizes)
        for part, n in parameter_breakdown(model).items():
            typer.echo(f"{part:<16}{n:>14,}")
        typer.echo(
            f"{'total':<16}{count_parameters(model):>14,}  ({cfg.predictor}, gates={cfg.gates}, dims {sizes})"
        )


@app.command("run")
def run_pipeline(
    pipeline: Annotated[str, typer.Argument(help="A TOML pipeline, e.g. pipelines/tuxpaint.toml")],
    workdir: Annotated[str | None, typer.Option(help="Where runs/ and stores/ go (default: here).")] = None,
    device: Device = None,
    precision: Precision = None,
    set_: Sets = None,
    verbose: Verbose = False,
) -> None:
    """Encode (reusing cached stores), train, evaluate, and print the metrics table."""
    _setup_logging(verbose)
    with _errors():
        cfg = _pipeline(pipeline, set_, device=device, precision=precision)
        from m3jepa.runner import run_all

        typer.echo(run_all(cfg, workdir=Path(workdir) if workdir else None))


@app.command("export")
def export(
    run: Annotated[str, typer.Option(help="A run directory written by train-predictor.")],
    out: Annotated[str, typer.Option(help="The folder to write: config.json, model.safetensors, README.md.")],
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    verbose: Verbose = False,
) -> None:
    """Export a run as a self-contained model folder (Hugging Face layout) that m3jepa.load reads.

    Example: m3jepa export --run runs/tuxpaint --out models/tuxpaint
    """
    _setup_logging(verbose)
    with _errors():
        _check_checkpoint(checkpoint)
        from m3jepa.api.export import export_run

        typer.echo(str(export_run(Path(run), Path(out), checkpoint=checkpoint, force=force)))


def _pipeline(path, overrides, store_root=None, dataset=None, run=None, device=None, precision=None):
    from m3jepa.config import load_pipeline

    extra = list(overrides or [])
    if device:
        extra.append(f"runtime.device={json.dumps(device)}")
    if precision:
        extra.append(f"runtime.precision={json.dumps(precision)}")
    if store_root:
        extra.append(f"encode.store_root={json.dumps(store_root)}")
    if dataset:
        extra.append(f"encode.dataset={json.dumps(dataset)}")
    if run:
        extra.append(f"run_dir={json.dumps(run)}")
    return load_pipeline(path, extra)


def _check_options(section: str, options: dict[str, object]) -> None:
    """Run CLI options that set `section.key` through that config section's own checks, before any work."""
    import m3jepa.config as config

    cls = {"eval": config.EvalConfig, "runtime": config.RuntimeConfig}[section]
    for key, value in options.items():
        if value is not None:
            try:
                config.from_dict(cls, {key: value}, section)
            except ConfigError as e:
                raise ConfigError(f"--{key.replace('_', '-')} {value}: {e}") from None


def _check_checkpoint(name: str) -> None:
    if name not in ("best", "latest"):
        raise ConfigError(f"--checkpoint {name!r} is not one of best, latest")


class _errors:
    """Turn the project's user-facing errors into one clear line and exit status 2."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or not isinstance(exc, (ValueError, FileNotFoundError, *_user_errors())):
            return False
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)


def _user_errors() -> tuple[type[BaseException], ...]:
    from m3jepa.data.records import BadItemError, DatasetError

    return (ConfigError, DatasetError, BadItemError)


def main() -> None:
    """Console-script entry point."""
    # OpenMP threads that spin while waiting starve each other on shared cores: a small index_add took
    # 189 ms on 2 spinning threads and 1.9 ms on 1, and PASSIVE took a training step from 22 to 127
    # samples/s (docs/benchmarks.md). Set before torch is imported (every stage imports it lazily);
    # an explicit OMP_WAIT_POLICY wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
