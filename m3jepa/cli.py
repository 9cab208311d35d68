"""The `m3jepa` command line: every stage, search and serving, and the tools around them.

Every command imports its stage lazily, so `m3jepa evaluate` never loads encoder code, and
logging is configured here only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from m3jepa.config import ConfigError, EncodeConfig, parse_override
from m3jepa.data import list_datasets

HELP = """M3-JEPA: align frozen encoders with a multi-gate MoE predictor, then search with it.

Train: run (all three stages), encode, train-predictor, evaluate, compare, model-info.
Use: export, embed, index, search, serve, lora-export.
Tools: stores (list, inspect, verify, import embeddings computed elsewhere), pipelines.

Example: m3jepa run tuxpaint
"""
app = typer.Typer(add_completion=False, no_args_is_help=True, help=HELP)
stores_app = typer.Typer(no_args_is_help=True, help="List, inspect and verify feature stores.\n\n"
                         "Example: m3jepa stores verify stores/tuxpaint/val/image/efficientnet-lite0")
app.add_typer(stores_app, name="stores")
pipelines_app = typer.Typer(no_args_is_help=True, help="List, show and copy the shipped pipelines.\n\n"
                            "Example: m3jepa pipelines copy tuxpaint my_tuxpaint.toml")
app.add_typer(pipelines_app, name="pipelines")

log = logging.getLogger("m3jepa")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _print_version(value: bool) -> None:
    if value:
        from m3jepa import __version__

        typer.echo(f"m3jepa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    # the callback exists for --version; the app's help text is the module docstring's first line
    pass


Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a config key: section.key=value.")]
Device = Annotated[
    str | None, typer.Option(help="runtime.device: auto | cpu | cuda | cuda:N (default: the config's).")
]
Precision = Annotated[
    str | None, typer.Option(help="runtime.precision: fp32 | bf16 (float32 master weights; bf16 autocast).")
]
Seeds = Annotated[str | None, typer.Option(
    help="Train one run per seed, e.g. 0,1,2 (train.seed): folders <run>-seed0, <run>-seed1, ...")]
Root = Annotated[str | None, typer.Option(
    help="The dataset folder (encode.root): where a folder dataset (jsonl, imagefolder, imagenet) was "
         "encoded from, which names its stores.")]
# Every --run is also --run-dir: torchrun's parser reads the whole command line, the script's arguments
# included, and refuses `--run` as an ambiguous abbreviation of its own --run-path/--run_path, so the
# documented multi-process commands use --run-dir (docs/training.md, "Multi-process";
# tests/test_torchrun.py checks every option name against torchrun's parser).
RUN = ("--run", "--run-dir")
Pipeline = Annotated[
    str | None, typer.Option(help="A shipped pipeline's name (m3jepa pipelines list) or a TOML file.")
]


# The defaults every `encode` option shows; EncodeConfig is the one place they are set.
_ENCODE_DEFAULTS = {f.name: getattr(EncodeConfig(), f.name) for f in dataclasses.fields(EncodeConfig)}


def _enc(key: str, text: str, *flags: str) -> typer.models.OptionInfo:
    """An `encode` option that sets encode.KEY: unset (None) leaves the pipeline's value or the default."""
    default = _ENCODE_DEFAULTS[key]
    if isinstance(default, list):
        shown = ",".join(default)
    elif isinstance(default, bool):
        shown = "on" if default else "off"
    else:
        shown = "the dataset's" if default is None else default
    return typer.Option(*flags, help=f"{text} (encode.{key}, default: {shown})", show_default=False)


@app.command()
def encode(
    pipeline: Pipeline = None,
    dataset: Annotated[str | None, _enc("dataset", f"One of {', '.join(list_datasets())}.")] = None,
    root: Annotated[
        str | None, _enc("root", "Dataset folder (webdataset: a folder, brace pattern or URL of tars).")
    ] = None,
    split: Annotated[str | None, _enc("splits", "Comma-separated splits, or all.")] = None,
    modality: Annotated[
        str | None, _enc("modalities", "Comma-separated modalities, or all (those with an encoder).")
    ] = None,
    image_encoder: Annotated[str | None, _enc("image_encoder", "Registry name or hf:<local dir>.")] = None,
    text_encoder: Annotated[str | None, _enc("text_encoder", "Registry name or hf:<local dir>.")] = None,
    audio_encoder: Annotated[str | None, _enc("audio_encoder", "Registry name or hf:<local dir>.")] = None,
    store_root: Annotated[str | None, _enc("store_root", "Where stores are written.")] = None,
    format: Annotated[str | None, _enc("format", "zarr | hdf5.", "--format")] = None,
    kind: Annotated[str | None, _enc("kind", "pooled | tokens | prefix (docs/lora.md).")] = None,
    tunable_layers: Annotated[
        int | None, _enc("tunable_layers", "--kind prefix: the states entering the last N encoder layers.")
    ] = None,
    workers: Annotated[int | None, _enc("workers", "Decoding worker processes.")] = None,
    decode_priority: Annotated[
        str | None, _enc("decode_priority", "auto | low | normal: the decoding workers' CPU priority.")
    ] = None,
    device: Annotated[str | None, _enc("device", "auto | cpu | cuda.")] = None,
    shard_size: Annotated[int | None, _enc("shard_size", "Rows per shard (the unit of resume).")] = None,
    limit: Annotated[int | None, _enc("limit", "Keep the first N groups of each split.")] = None,
    seed: Annotated[int | None, _enc("seed", "Seed of the dataset's split.")] = None,
    skip_bad: Annotated[
        bool | None, _enc("skip_bad", "Skip bad items; the manifest lists them.", "--skip-bad/--no-skip-bad")
    ] = None,
    threads: Annotated[int | None, _enc("threads", "Torch threads per process (unset: torch's).")] = None,
    content_hash: Annotated[
        str | None, _enc("content_hash", "stat | sha256: how media files are fingerprinted.")
    ] = None,
    force: Annotated[
        bool | None, _enc("force", "Re-encode the requested stores from scratch.", "--force/--no-force")
    ] = None,
    caption_field: Annotated[
        str | None, _enc("caption_field", "webdataset: the .json field holding the caption (unset: .txt).")
    ] = None,
    split_field: Annotated[
        str | None, _enc("split_field", "webdataset: the .json field naming each sample's split.")
    ] = None,
    train_shards: Annotated[str | None, _enc("train_shards", "webdataset: the train split's shards.")] = None,
    val_shards: Annotated[str | None, _enc("val_shards", "webdataset: the val split's shards.")] = None,
    test_shards: Annotated[str | None, _enc("test_shards", "webdataset: the test split's shards.")] = None,
    set_: Sets = None,
    verbose: Verbose = False,
) -> None:
    """Run the frozen encoders once and write feature stores (resumable; torchrun shares shards).

    Settings come from the defaults (m3jepa.config.EncodeConfig), then the encode section of --pipeline,
    then --set encode.KEY=VALUE, then these options.

    Example: m3jepa encode --dataset tuxpaint --limit 40 --split val
    """
    params = dict(locals())  # the command's parameters as given, before any other name is bound
    _setup_logging(verbose)
    with _errors():
        cfg = _encode_config(params)
        from m3jepa.encode.runner import run_encode

        summary = run_encode(cfg)
        typer.echo(summary.table())


@stores_app.command("list")
def stores_list(
    store_root: Annotated[
        str, typer.Argument(help="Store root to scan: a folder or a URL (s3://bucket/prefix).")
    ] = "stores",
    verbose: Verbose = False,
) -> None:
    """List the stores under a root with their row counts and encoders.

    Example: m3jepa stores list stores
    """
    _setup_logging(verbose)
    from m3jepa.store.cli_views import list_view

    with _errors():
        typer.echo(list_view(store_root))


@stores_app.command("inspect")
def stores_inspect(
    path: Annotated[str, typer.Argument(help="A store directory or URL.")], verbose: Verbose = False
):
    """Print a store's manifest summary.

    Example: m3jepa stores inspect stores/tuxpaint/val/image/efficientnet-lite0
    """
    _setup_logging(verbose)
    from m3jepa.store.cli_views import inspect_view

    with _errors():
        typer.echo(inspect_view(path))


@stores_app.command("verify")
def stores_verify(
    path: Annotated[str, typer.Argument(help="A store directory or URL.")],
    download: Annotated[
        bool | None,
        typer.Option("--download/--listing", help="At a URL: also download and hash every byte (default: "
                     "check the files against the bucket's listing only). A local store is always hashed."),
    ] = None,
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
    caption_field: Annotated[str | None, typer.Option(help="webdataset: encode's --caption-field.")] = None,
    split_field: Annotated[str | None, typer.Option(help="webdataset: as encode's --split-field.")] = None,
    train_shards: Annotated[str | None, typer.Option(help="webdataset: as encode's --train-shards.")] = None,
    val_shards: Annotated[str | None, typer.Option(help="webdataset: as encode's --val-shards.")] = None,
    test_shards: Annotated[str | None, typer.Option(help="webdataset: as encode's --test-shards.")] = None,
    verbose: Verbose = False,
):
    """Check a store's checksums and row counts, and with --dataset/--root whether it is stale; exit status 1
    on a corrupt or stale store.

    Example: m3jepa stores verify stores/tuxpaint/val/image/efficientnet-lite0 --dataset tuxpaint
    """
    _setup_logging(verbose)
    from m3jepa.store.verify import verify_store

    with _errors():
        report = verify_store(path, download=download)
        if (dataset or root) and report.ok:  # a corrupt store is not judged against its dataset
            from m3jepa.encode.source import check_source

            options = EncodeConfig(caption_field=caption_field, split_field=split_field,
                                   train_shards=train_shards, val_shards=val_shards,
                                   test_shards=test_shards).dataset_options()
            check_source(report, dataset, root, seed, limit, options)
        typer.echo(report.text())
        if not report.ok:
            raise typer.Exit(1)


@stores_app.command("import")
def stores_import(
    source: Annotated[str, typer.Argument(help="The folder of embeddings (clip-retrieval's output).")],
    dataset: Annotated[str, typer.Option(help="The stores' dataset name (encode.dataset of runs on them).")],
    image_encoder: Annotated[
        str | None, typer.Option(help="The model that made the image embeddings (names its stores).")
    ] = None,
    text_encoder: Annotated[
        str | None, typer.Option(help="The model that made the text embeddings (names its stores).")
    ] = None,
    store_root: Annotated[
        str, typer.Option(help="Where the stores are written: a folder or a URL (s3://bucket/prefix).")
    ] = "stores",
    image_glob: Annotated[str, typer.Option(help="Image .npy files under SOURCE; 'none': no image.")] = (
        "img_emb/img_emb_*.npy"),
    text_glob: Annotated[str, typer.Option(help="Text .npy files under SOURCE; 'none': no text.")] = (
        "text_emb/text_emb_*.npy"),
    metadata_glob: Annotated[str, typer.Option(help="The .parquet files under SOURCE, one per shard.")] = (
        "metadata/metadata_*.parquet"),
    key_column: Annotated[
        str | None, typer.Option(help="The column naming each sample (default: key, else image_path).")
    ] = None,
    caption_column: Annotated[
        str | None, typer.Option(help="The caption column kept on text rows (default: caption, if present).")
    ] = None,
    split_column: Annotated[
        str | None, typer.Option(help="A column holding train/val/test (default: a seeded hash of the key).")
    ] = None,
    split: Annotated[str | None, typer.Option(help="Put every row in this split instead.")] = None,
    seed: Annotated[int, typer.Option(help="The seed of the key hash split.")] = 0,
    dtype: Annotated[str, typer.Option(help="float16 | float32: the stores' dtype.")] = "float16",
    format: Annotated[str, typer.Option("--format", help="zarr | hdf5.")] = "zarr",
    shard_size: Annotated[int, typer.Option(help="Rows per store shard (the unit of resume).")] = 2048,
    skip_bad: Annotated[bool, typer.Option(help="Import rows with NaN/inf as invalid rows.")] = False,
    allow_gaps: Annotated[bool, typer.Option(help="Accept missing shard numbers (empty partitions).")] = (
        False),
    content_hash: Annotated[
        str, typer.Option(help="stat | sha256: how the source files are fingerprinted.")
    ] = "stat",
    force: Annotated[bool, typer.Option(help="Import again over stores of another source.")] = False,
    verbose: Verbose = False,
) -> None:
    """Turn embeddings computed elsewhere (clip-retrieval's img_emb/, text_emb/, metadata/, or any .npy +
    .parquet pairs) into feature stores that train-predictor, evaluate and index read (docs/feature-store.md).

    Example: m3jepa stores import emb --dataset cc3m-clip --image-encoder clip-b32 --text-encoder clip-b32
    """
    _setup_logging(verbose)
    with _errors():
        from m3jepa.encode.import_source import local_source
        from m3jepa.encode.importer import ImportOptions, run_import
        from m3jepa.location import location

        root = location(store_root)  # a secret in a URL is refused here, before anything is read or written
        _check_options("encode", {"dtype": dtype, "format": format, "content_hash": content_hash,
                                  "shard_size": shard_size})
        globs = {"image": image_glob, "text": text_glob, "metadata": metadata_glob}
        encoders = {m: e for m, e in (("image", image_encoder), ("text", text_encoder)) if e}
        opts = ImportOptions(
            source=local_source(source), dataset=dataset, encoders=encoders, store_root=root,
            globs={k: None if v == "none" else v for k, v in globs.items()}, key_column=key_column,
            caption_column=caption_column, split_column=split_column, split=split, seed=seed, dtype=dtype,
            format=format, shard_size=shard_size, skip_bad=skip_bad, force=force, allow_gaps=allow_gaps,
            content_hash=content_hash,
        )
        result = run_import(opts)
        typer.echo(result.table())
        typer.echo(result.next_command(root))


@pipelines_app.command("list")
def pipelines_list() -> None:
    """List the shipped pipelines: the name `m3jepa run NAME` takes and a one-line description.

    Example: m3jepa pipelines list
    """
    from m3jepa.pipelines import shipped, summary

    files = shipped()
    width = max(map(len, files))
    for name, path in files.items():
        typer.echo(f"{name:<{width}}  {summary(path)}")


@pipelines_app.command("show")
def pipelines_show(name: Annotated[str, typer.Argument(help="A shipped pipeline's name.")]) -> None:
    """Print a shipped pipeline's TOML.

    Example: m3jepa pipelines show tuxpaint
    """
    from m3jepa.pipelines import shipped_file

    with _errors():
        typer.echo(shipped_file(name).read_text(), nl=False)


@pipelines_app.command("copy")
def pipelines_copy(
    name: Annotated[str, typer.Argument(help="A shipped pipeline's name.")],
    dest: Annotated[str, typer.Argument(help="The file to write, or a folder to write NAME.toml in.")],
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a shipped pipeline to a file to edit (`m3jepa run FILE` runs the copy).

    Example: m3jepa pipelines copy tuxpaint my_tuxpaint.toml
    """
    from m3jepa.pipelines import copy

    with _errors():
        typer.echo(str(copy(name, dest, force=force)))


@app.command("train-predictor")
def train_predictor(
    pipeline: Pipeline = None,
    store_root: Annotated[str | None, typer.Option(help="Overrides encode.store_root.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Overrides encode.dataset.")] = None,
    run: Annotated[str | None, typer.Option(*RUN, help="Run directory (default runs/<name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its latest checkpoint.")] = False,
    seeds: Seeds = None,
    root: Root = None,
    device: Device = None,
    precision: Precision = None,
    set_: Sets = None,
    verbose: Verbose = False,
) -> None:
    """Train the predictor from cached feature stores (never runs an encoder).

    Example: m3jepa train-predictor --pipeline tuxpaint --run runs/tp --set train.lr=1e-3
    """
    _setup_logging(verbose)
    with _errors():
        cfg = _pipeline(pipeline, set_, store_root=store_root, dataset=dataset, run=run, device=device,
                        precision=precision, root=_abs(root))
        from m3jepa.runner import seed_configs
        from m3jepa.train.loop import train
        from m3jepa.train.recipes import SIZED_KEYS

        # no pipeline: the predictor and the steps are sized from the train pairs, except what --set gives
        given = {".".join(parse_override(item)[0]) for item in set_ or []}
        auto = None if pipeline is not None else SIZED_KEYS - given
        for one in seed_configs(cfg, _seeds(seeds, given)):
            typer.echo(train(one, resume=resume, auto_keys=auto).summary())


@app.command()
def evaluate(
    run: Annotated[str, typer.Option(*RUN, help="A run directory written by train-predictor.")],
    split: Annotated[str | None, typer.Option(help="Split to score (default: eval.split).")] = None,
    protocol: Annotated[str | None, typer.Option(help="multi | paired")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    json_: Annotated[bool, typer.Option("--json", help="Print the metrics JSON on stdout.")] = False,
    root: Root = None,
    device: Device = None,
    precision: Precision = None,
    verbose: Verbose = False,
) -> None:
    """Score a trained run: retrieval R@1/5/10 both ways, gallery sizes, query latency.

    Example: m3jepa evaluate --run runs/tp --split test --json
    """
    _setup_logging(verbose)
    with _errors():
        _check_options("eval", {"split": split, "protocol": protocol})
        _check_options("runtime", {"device": device, "precision": precision})
        _check_checkpoint(checkpoint)
        from m3jepa.eval.evaluate import evaluate_run

        metrics = evaluate_run(
            Path(run), split=split, protocol=protocol, checkpoint=checkpoint, device=device,
            precision=precision, root=_abs(root),
        )
        typer.echo(json.dumps(metrics.to_json(), indent=2) if json_ else metrics.table())


@app.command()
def compare(
    runs: Annotated[list[str], typer.Argument(help="Run directories written by train-predictor.")],
    split: Annotated[str, typer.Option(help="The split whose metrics to show (evaluate --split).")] = "test",
    json_: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    plot: Annotated[str | None, typer.Option(
        help="Where to write the bar plot of mean R@1 ± std (default: compare.png in the runs' common "
             "folder); 'none' writes none.")] = None,
) -> None:
    """Compare runs grouped by config (seeds pooled): mean ± std, chance, which differences beat the noise.

    Example: m3jepa compare runs/tp-seed0 runs/tp-seed1 runs/tp-seed2 runs/tp_mlp-seed0 runs/tp_mlp-seed1
    """
    with _errors():
        _check_options("eval", {"split": split})
        from m3jepa.eval.compare import compare_runs, default_plot, markdown, plot_groups

        paths = [Path(r) for r in runs]
        result = compare_runs(paths, split=split)
        if plot != "none" and any(g["evaluated"] for g in result["groups"]):
            result["plot"] = str(plot_groups(result, Path(plot) if plot else default_plot(paths)))
        typer.echo(json.dumps(result, indent=2) if json_ else markdown(result)
                   + (f"\nplot: {result['plot']}\n" if "plot" in result else ""), nl=json_)


@app.command("lora-export")
def lora_export(
    run: Annotated[str, typer.Option(*RUN, help="A LoRA run directory written by train-predictor.")],
    out: Annotated[str, typer.Option(help="Where to write one folder per tuned modality.")],
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    merge: Annotated[
        bool, typer.Option(help="Merge the adapters into the tail layers' weights instead of copying them.")
    ] = False,
    verbose: Verbose = False,
) -> None:
    """Export a LoRA run's adapters (peft format), or the tail layers with the adapters merged in.

    Example: m3jepa lora-export --run runs/tuxpaint_lora --out exported --merge
    """
    _setup_logging(verbose)
    with _errors():
        _check_checkpoint(checkpoint)
        from m3jepa.lora.export import export_lora

        for path in export_lora(Path(run), Path(out), checkpoint=checkpoint, merge=merge):
            typer.echo(str(path))


@app.command("model-info")
def model_info(
    pipeline: Annotated[
        str | None, typer.Option(help="A shipped pipeline's name or a TOML file (default: the paper preset).")
    ] = None,
    dims: Annotated[
        str, typer.Option(help="Latent dims, e.g. image=1024,text=4096.")
    ] = "image=1024,text=4096",
    set_: Sets = None,
) -> None:
    """Print the predictor's FLOPs per sample and parameter count per part (the paper preset by default:
    140.6M parameters).

    Example: m3jepa model-info --pipeline tuxpaint --dims image=1280,text=384
    """
    with _errors():
        import torch

        from m3jepa.config import PipelineConfig
        from m3jepa.model import build_predictor, flops
        from m3jepa.model.predictor import count_parameters, paper_preset, parameter_breakdown

        pipe = _pipeline(pipeline, set_) if pipeline or set_ else PipelineConfig()
        cfg = pipe.model if pipeline or set_ else paper_preset()
        sizes = _dims_option(dims)
        directions = [d for d in pipe.train.directions if _direction_fits(d, sizes)] or [
            f"{a}->{b}" for a in sizes for b in sizes if a != b
        ]
        batch = pipe.train.batch_size
        typer.echo(f"{'GFLOP/sample':<16}{'forward':>14}{'train step':>14}  (matrix products, top-k experts)")
        for d in directions:
            fwd, step = flops.forward_flops(cfg, sizes, d), flops.train_flops(cfg, sizes, d)
            typer.echo(f"{d:<16}{fwd / 1e9:>14.4f}{step / 1e9:>14.4f}")
        fwd, step = (flops.logits_flops(cfg, batch, train) / 1e9 for train in (False, True))
        typer.echo(f"{'InfoNCE logits':<16}{fwd:>14.4f}{step:>14.4f}  (at batch {batch}: they grow with it)")
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            model = build_predictor(cfg, sizes)
        for part, n in parameter_breakdown(model).items():
            typer.echo(f"{part:<16}{n:>14,}")
        typer.echo(
            f"{'total':<16}{count_parameters(model):>14,}  ({cfg.predictor}, gates={cfg.gates}, dims {sizes})"
        )


def _dims_option(text: str) -> dict[str, int]:
    """--dims image=1024,text=4096 as {modality: width}; ConfigError naming the item that is not one."""
    from m3jepa.core.memory import check_dims

    sizes: dict[str, object] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not name.strip() or not value.strip().isdigit():
            raise ConfigError(f"--dims {item.strip()[:40]!r} is not modality=width, e.g. image=1024")
        sizes[name.strip()] = int(value)
    return check_dims(sizes, "--dims")


def _direction_fits(direction: str, dims: dict[str, int]) -> bool:
    """Whether every modality a direction names has a dimension in `dims` (model-info's --dims)."""
    from m3jepa.model.predictor import parse_direction

    parsed = parse_direction(direction)
    return all(m in dims for m in (*parsed.sources, parsed.target))


@app.command("run")
def run_pipeline(
    pipeline: Annotated[
        str, typer.Argument(help="A shipped pipeline's name (m3jepa pipelines list) or a TOML file.")
    ],
    workdir: Annotated[str | None, typer.Option(help="Where runs/ and stores/ go (default: here).")] = None,
    run: Annotated[str | None, typer.Option(
        *RUN, help="The run folder (default: runs/<the pipeline's name>; relative to --workdir). A folder "
             "holding a run of another config is refused; one of this config is continued.")] = None,
    seeds: Seeds = None,
    device: Device = None,
    precision: Precision = None,
    set_: Sets = None,
    verbose: Verbose = False,
) -> None:
    """Encode (reusing cached stores), train (continuing this config's run), evaluate, print the metrics.

    Example: m3jepa run tuxpaint --workdir /tmp/m3jepa --set train.epochs=5
    """
    _setup_logging(verbose)
    with _errors():
        cfg = _pipeline(pipeline, set_, device=device, precision=precision, run=run)
        from m3jepa.runner import run_seeds

        given = {".".join(parse_override(item)[0]) for item in set_ or []}
        typer.echo(run_seeds(cfg, _seeds(seeds, given), workdir=Path(workdir) if workdir else None))


@app.command("export")
def export(
    run: Annotated[str, typer.Option(*RUN, help="A run directory written by train-predictor.")],
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


SearchDevice = Annotated[str, typer.Option(help="Where the model runs: auto | cpu | cuda | cuda:N.")]


@app.command()
def embed(
    run: Annotated[str, typer.Option(*RUN, help="A run directory (or an m3jepa export folder).")],
    split: Annotated[str, typer.Option(help="The split whose store to embed, e.g. test.")],
    modality: Annotated[str, typer.Option(help="A modality the model targets (the gallery), e.g. image.")],
    out: Annotated[str | None, typer.Option(help="Default: RUN/embedded/SPLIT/MODALITY.")] = None,
    checkpoint: Annotated[str, typer.Option(help="best | latest")] = "best",
    device: SearchDevice = "auto",
    force: Annotated[bool, typer.Option(help="Rewrite an --out embedded with another model/store.")] = False,
    verbose: Verbose = False,
) -> None:
    """Write a run's store in the model's aligned (cl) space as a new feature store (the gallery rows).

    Example: m3jepa embed --run runs/tuxpaint --split test --modality image
    """
    _setup_logging(verbose)
    with _errors():
        _check_checkpoint(checkpoint)
        from m3jepa.api import load
        from m3jepa.search import embed_run

        done = embed_run(load(Path(run), checkpoint=checkpoint, device=device), split, modality,
                         Path(out) if out else None, force=force)
        typer.echo(f"{done.path}{' (cached)' if done.cached else ''}")


@app.command()
def index(
    store: Annotated[str | None, typer.Option(help="An embedded store (written by m3jepa embed).")] = None,
    run: Annotated[
        str | None, typer.Option(*RUN, help="Or: a run (or export) to embed with first.")
    ] = None,
    split: Annotated[str | None, typer.Option(
        help="With --run: the split, or all (every split of the run, indexed together).")] = None,
    modality: Annotated[str | None, typer.Option(help="With --run --split: the gallery modality.")] = None,
    images: Annotated[str | None, typer.Option(
        help="With --run: a folder of your own images (recursive; a rerun updates the index).")] = None,
    texts: Annotated[str | None, typer.Option(
        help="With --run: a text file of captions, one a line (a rerun updates the index).")] = None,
    content_hash: Annotated[str, typer.Option(
        help="With --images: how a changed file is noticed: stat (size and mtime) | sha256 (its bytes).")] = (
        "stat"),
    out: Annotated[str | None, typer.Option(
        help="The index folder (default: STORE.index; with --images DIR / --texts FILE: ./NAME.index).")] = (
        None),
    kind: Annotated[str, typer.Option(help="auto | flat | ivf-flat | ivf-sq8 | ivf-pq | hnsw")] = "auto",
    memory_budget: Annotated[str, typer.Option(help="The most the index may hold in memory, e.g. 4GB.")] = (
        "4GB"),
    checkpoint: Annotated[str, typer.Option(help="With --run: best | latest")] = "best",
    root: Root = None,
    device: SearchDevice = "auto",
    force: Annotated[bool, typer.Option(help="Rebuild an existing --out.")] = False,
    verbose: Verbose = False,
) -> None:
    """Build a faiss index over an embedded gallery, a run's split, or your own images or captions.

    Rows keep their ids, caption and media path; --images and --texts embed the files themselves.
    A rerun of --images or --texts embeds only new and changed files and drops removed ones.

    Example: m3jepa index --run runs/tuxpaint --images ~/Photos --out my.index
    """
    _setup_logging(verbose)
    with _errors():
        _check_checkpoint(checkpoint)
        from m3jepa.api import load

        folder = images if images is not None else texts
        if folder is not None:
            if run is None or store is not None or split or modality or (images and texts):
                raise ConfigError("give --run R with one of --images DIR or --texts FILE (and no --store, "
                                  "--split or --modality)")
            from m3jepa.search.folder import index_folder

            what = "images" if images is not None else "texts"
            source = Path(folder).expanduser()
            name = source.resolve().name if images is not None else source.stem
            target = Path(out) if out else Path(f"{name}.index")
            model = load(Path(run), checkpoint=checkpoint, device=device)
            path, update = index_folder(model, what, source, target,
                                        content_hash=content_hash, index_kind=kind,
                                        memory_budget=memory_budget, force=force)
            m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
            typer.echo(f"{_index_line(path, m, False)}\n{update.line(m['rows'], what)}")
            return
        path, cached = _index_gallery(store, run, split, modality, out, kind, memory_budget, checkpoint,
                                      device, force, _abs(root))
        m = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        typer.echo(_index_line(path, m, cached))


def _index_gallery(store: str | None, run: str | None, split: str | None, modality: str | None,
                   out: str | None, kind: str, memory_budget: str, checkpoint: str, device: str,
                   force: bool, root: str | None = None) -> tuple[Path, bool]:
    """`index --store` or `index --run --split --modality`: (the index folder, whether it was cached).

    `root` (`--root`): where the run's folder dataset is, when its saved encode.root does not say."""
    from m3jepa.api import load
    from m3jepa.search import embed_run, index_stores
    from m3jepa.search.embed import default_out as embedded_out
    from m3jepa.search.embed import read_sidecar, run_splits
    from m3jepa.search.gallery import default_out
    from m3jepa.search.identity import ModelRef, load_model

    if (store is None) == (run is None) or (run is not None and not (split and modality)):
        raise ConfigError("give --store EMBEDDED, or --run R with --split and --modality (or --images DIR, "
                          "or --texts FILE)")
    if run is not None:
        model = load(Path(run), checkpoint=checkpoint, device=device)
        if root is not None:  # a folder dataset's stores are named by its folder
            encode = dataclasses.replace(model.cfg.encode, root=root)
            model.cfg = dataclasses.replace(model.cfg, encode=encode)
        splits = run_splits(model, modality) if split == "all" else [split]
        embedded = [embed_run(model, s, modality).path for s in splits]
        first = embedded_out(Path(model.source.path), "all", modality, model.source.kind)
        default = default_out(embedded[0]) if len(embedded) == 1 else default_out(first)
    else:
        embedded = [Path(store)]
        ref = ModelRef.from_json(read_sidecar(embedded[0])["model"], embedded[0])
        model = load_model(ref, device, embedded[0])
        default = default_out(embedded[0])
    return index_stores(embedded, Path(out) if out else default, model, kind=kind,
                        memory_budget=memory_budget, force=force)


def _index_line(path: Path, m: dict, cached: bool) -> str:
    return (f"{path}{' (cached)' if cached else ''}: {m['kind']} ({m['factory']}) over {m['rows']} "
            f"rows x {m['dim']}, {m['search_params'] or 'exact'}, recall@10 {m['recall@10']:.4f} on "
            f"{m['recall']['queries']} queries, built in {m['build_seconds']} s")


@app.command()
def search(
    index: Annotated[str, typer.Option("--index", help="An index folder written by m3jepa index.")],
    text: Annotated[str | None, typer.Option(help="A caption to search with.")] = None,
    image: Annotated[str | None, typer.Option(help="An image file to search with.")] = None,
    audio: Annotated[str | None, typer.Option(help="An audio file to search with.")] = None,
    latents: Annotated[str | None, typer.Option(
        help="A .npy of query latents, (N, D) or (D,), in the --source modality's stage-1 space (the "
             "embeddings of the tool that made the model's stores, e.g. an import's).")] = None,
    source: Annotated[str | None, typer.Option(
        help="The modality of --latents (default: the one the model searches this index from, when it "
             "is one).")] = None,
    k: Annotated[int, typer.Option("--k", help="How many results.")] = 10,
    json_: Annotated[bool, typer.Option("--json", help="Print the hits as JSON.")] = False,
    device: SearchDevice = "auto",
    threads: Annotated[int | None, typer.Option(
        help="torch and faiss threads for queries (default: their own); 1 was the fastest for one query at a "
             "time on 2 cores (docs/benchmarks.md, section 7).")] = None,
    verbose: Verbose = False,
) -> None:
    """Search an index with a caption, an image, a sound or precomputed latents, through the model the
    index names.

    Example: m3jepa search --index runs/tuxpaint/embedded/test/image.index --text "a red flower"
    """
    _setup_logging(verbose)
    with _errors():
        given = {m: v for m, v in (("text", text), ("image", image), ("audio", audio), ("latents", latents))
                 if v is not None}
        if len(given) != 1:
            raise ConfigError("give exactly one of --text, --image, --audio, --latents")
        if source is not None and latents is None:
            raise ConfigError("--source names the modality of --latents; --text, --image and --audio name "
                              "their own")
        _set_threads(threads)
        from m3jepa.search import Searcher

        searcher = Searcher.open(index, device=device)
        if latents is not None:
            _search_latents(searcher, index, Path(latents), source, k, json_)
            return
        from m3jepa.search.searcher import hits_table

        (modality, value), = given.items()
        hits = searcher.query(modality, value, k=k)
        if json_:
            typer.echo(json.dumps({"index": index, "gallery": searcher.gallery, "gallery_size": searcher.size,
                                   "query": {modality: value}, "k": k, "hits": [h.to_json() for h in hits]},
                                  indent=2, ensure_ascii=False))
        else:
            typer.echo(f"{searcher.gallery} gallery {index}: top {len(hits)} of {searcher.size:,} rows")
            typer.echo(hits_table(hits))


def _search_latents(searcher, index: str, path: Path, source: str | None, k: int, json_: bool) -> None:
    """`search --latents`: every row of the file through `Searcher.query_latents`, one answer per row."""
    from m3jepa.search.queries import read_query_latents
    from m3jepa.search.searcher import hits_table

    if source is None:
        if len(searcher.sources) != 1:
            raise ConfigError(f"--source is needed: the model searches {searcher.gallery} from "
                              f"{', '.join(searcher.sources)}")
        source = searcher.sources[0]
    rows = read_query_latents(path, source, searcher.source_dim(source))  # (N, D_source)
    answers = searcher.query_latents(source, rows, k=k)
    if json_:
        typer.echo(json.dumps([{"index": index, "gallery": searcher.gallery, "gallery_size": searcher.size,
                                "query": {"latents": str(path), "source": source, "row": i}, "k": k,
                                "hits": [h.to_json() for h in hits]} for i, hits in enumerate(answers)],
                              indent=2, ensure_ascii=False))
        return
    typer.echo(f"{searcher.gallery} gallery {index}: top {len(answers[0])} of {searcher.size:,} rows for "
               f"each of {len(answers)} {source} latents in {path}")
    for i, hits in enumerate(answers):
        typer.echo(f"\nquery {i} (row {i} of {path.name})")
        typer.echo(hits_table(hits))


def _set_threads(threads: int | None) -> None:
    """--threads: torch's intra-op and faiss's OpenMP threads for this process (None: leave both alone)."""
    if threads is None:
        return
    if threads < 1:
        raise ConfigError(f"--threads {threads} must be at least 1 (or left out for torch's and faiss's own)")
    from m3jepa.config import PARALLEL_PER_CPU, cpu_count

    if threads > (ceiling := PARALLEL_PER_CPU * cpu_count()):
        raise ConfigError(f"--threads {threads:,} is over this machine's ceiling of {ceiling} "
                          f"({PARALLEL_PER_CPU} per logical CPU; it has {cpu_count()})")
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _encode_config(params: dict[str, object]) -> EncodeConfig:
    """`encode`'s config from its parameters: defaults < --pipeline < --set < the options given.

    Each option sets the EncodeConfig field of its name (--split and --modality: splits, modalities).
    """
    values: dict[str, object] = {}
    for name, value in params.items():
        key = {"split": "splits", "modality": "modalities"}.get(name, name)
        if key in ("splits", "modalities"):
            value = _csv(value) or None  # type: ignore[arg-type]
        if key in _ENCODE_DEFAULTS and value is not None:
            values[f"encode.{key}"] = value
    return _load(params.get("pipeline"), params.get("set_"), values).encode  # type: ignore[arg-type]


@app.command()
def serve(
    index: Annotated[
        list[str], typer.Option("--index", help="An index folder (or NAME=FOLDER); repeat for each gallery.")
    ],
    host: Annotated[
        str, typer.Option(help="Address to bind; the default is loopback only (docs/serve.md).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    device: SearchDevice = "auto",
    batch_window_ms: Annotated[float, typer.Option(
        help="Under load, how long new text queries wait to share one encoder call (0: never wait).")] = 10.0,
    query_encoder_precision: Annotated[str, typer.Option(
        help="fp32, or int8: text queries through MiniLM with int8 Linear layers, ~2x faster on a CPU, "
             "close to but not equal to fp32 (docs/serve.md).")] = "fp32",
    threads: Annotated[int | None, typer.Option(
        help="torch and faiss threads for queries (default: their own); 1 was the fastest for one query at a "
             "time on 2 cores (docs/benchmarks.md, section 7).")] = None,
    verbose: Verbose = False,
) -> None:
    """Serve search indexes of one model over HTTP: a web page, a JSON API and the indexed media.

    Example: m3jepa serve --index runs/tp/embedded/test/image.index --index runs/tp/embedded/test/text.index
    """
    _setup_logging(verbose)
    with _errors():
        if not 0 < port < 65536:
            raise ConfigError(f"--port {port} is not a TCP port (1 to 65535)")
        if not 0 <= batch_window_ms <= 1000:
            raise ConfigError(f"--batch-window-ms {batch_window_ms} is not in [0, 1000]")
        if query_encoder_precision not in ("fp32", "int8"):
            raise ConfigError(f"--query-encoder-precision {query_encoder_precision} is not one of fp32, int8")
        _set_threads(threads)
        from m3jepa.serve import serve as run_server

        run_server(index, host=host, port=port, device=device, batch_window_s=batch_window_ms / 1e3,
                   query_encoder_precision=query_encoder_precision)


# The config key each shared command option sets (after --set, so the option wins).
_OPTION_KEYS = {"device": "runtime.device", "precision": "runtime.precision",
                "store_root": "encode.store_root", "dataset": "encode.dataset", "run": "run_dir",
                "root": "encode.root"}


def _abs(path: str | None) -> str | None:
    """A dataset folder as an absolute path: a folder dataset's stores are named by it, and the run's
    saved config must find them again from any working directory (evaluate, index)."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _seeds(value: str | None, given: set[str]) -> list[int] | None:
    """--seeds 0,1,2 as ints (None: one run with train.seed as configured)."""
    if value is None:
        return None
    if "train.seed" in given:
        raise ConfigError("give the seeds with --seeds or train.seed with --set, not both")
    try:
        seeds = [int(v) for v in _csv(value) or []]
    except ValueError:
        raise ConfigError(f"--seeds {value!r} must be integers separated by commas, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {value!r} must name at least one seed, each once")
    return seeds


def _pipeline(path: str | None, overrides: list[str] | None, **options: str | None):
    values = {_OPTION_KEYS[name]: value for name, value in options.items() if value}
    return _load(path, overrides, values)


def _load(path: str | None, overrides: list[str] | None, values: dict[str, object]):
    """The pipeline named or at `path` (None: the defaults), with --set overrides, then option values."""
    from m3jepa.config import load_pipeline
    from m3jepa.pipelines import resolve

    return load_pipeline(resolve(path) if path is not None else None, overrides, values=values)


def _check_options(section: str, options: dict[str, object]) -> None:
    """Run CLI options that set `section.key` through that config section's own checks, before any work."""
    import m3jepa.config as config

    cls = {"eval": config.EvalConfig, "runtime": config.RuntimeConfig, "encode": config.EncodeConfig}[section]
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
    from m3jepa.progress import quiet_library_bars

    quiet_library_bars()  # a log file gets no `Loading weights: 0%|...|` fragments
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
