"""`m3jepa export`: a run's checkpoint as a self-contained folder in the Hugging Face layout.

    DIR/config.json         the model: format, dims, directions, encoders (name, revision), vocabularies,
                            the resolved pipeline config, where it came from and its metrics
    DIR/model.safetensors   the predictor and loss weights (no encoder weights: those are the encoders')
    DIR/adapters/<m>/       a LoRA run's adapters in peft's format (adapter_config.json + safetensors)
    DIR/vocabularies.safetensors  the stage-1 latents of a class list or candidate answers: only for a
                            model with a label or answer modality
    DIR/README.md           a model card: what it is, how it was trained, its metrics, how to load it
    DIR/checksums.json      the sha256 of every file the loader reads and of config.json's meaning, which
                            the loader verifies (core/exportfiles.py)

`m3jepa.load(DIR)` rebuilds the same model: its outputs equal the run's, bit for bit (tested). Every
file is mode 0644 (folders 0755): an export is made to be shared. Exporting the same checkpoint again
gives the same bytes (tested): indexes that recorded an export's weights keep matching. The layout's names
are m3jepa/core/layout.py's; the loader that reads it back is m3jepa/core/trained.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from m3jepa import __version__
from m3jepa.api.raw import ApiError
from m3jepa.config import to_dict
from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.exportfiles import write_export_checksums
from m3jepa.core.layout import ExportDir, RunDir
from m3jepa.core.trained import EXPORT_FORMAT, EXPORT_VERSION, open_run
from m3jepa.files import atomic_write_text, refused_writes, replace_dir

# An export is made to be shared: its files are world-readable, whatever the umask made its checkpoint.
FILE_MODE = 0o644


def export_run(run: Path, out: Path, checkpoint: str = "best", force: bool = False) -> Path:
    """Write `run`'s `checkpoint` to `out` (refused when `out` holds files, unless `force` and it holds an
    export; refused when `out` and the run lie inside one another)."""
    _check_out(run, out, force)
    try:
        trained = open_run(run, checkpoint)  # the one loader: every file verified against checksums.json
        names, latents = trained.vocabularies()
    except CheckpointError as e:
        raise ApiError(str(e)) from None
    tmp = ExportDir(out.with_name(out.name + ".tmp-export"))
    if tmp.path.exists():
        shutil.rmtree(tmp.path)
    weights = {k: v.contiguous() for k, v in trained.weights.items()}
    need = sum(v.numel() * v.element_size() for v in weights.values())
    need += sum(v.nbytes for v in latents.values())
    kept = f"the export at {out} as it was" if out.exists() else ""
    # a full disk: one line, the partial folder removed, a previous export at `out` untouched (files.py)
    with refused_writes(out.parent, need=need, remove=[tmp.path], removed=f"the partial {tmp.path.name}",
                        kept=kept):
        _write(trained, run, checkpoint, tmp, weights, names, latents)
    replace_dir(tmp.path, out, ".old-export")
    return out


def _check_out(run: Path, out: Path, force: bool) -> None:
    """Refuse an --out the export would damage: the run itself (or a folder inside it, or one holding it,
    which --force would delete with the run), or with --force a folder that holds something else than an
    export."""
    r, o = run.resolve(), out.resolve()
    if o == r or r in o.parents or o in r.parents:
        where = "is the run" if o == r else ("is inside the run" if r in o.parents else "holds the run")
        raise ApiError(f"--out {out} {where} {run}: an export is written beside a run, never in it or around "
                       "it (--force would delete the run); choose an --out outside the run")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ApiError(f"{out} is not empty; choose another --out or pass --force")
    if not ExportDir.holds_export(out):
        raise ApiError(f"{out} holds files but no m3jepa export (config.json and model.safetensors): --force "
                       "replaces only an export; choose another --out, or empty it yourself")


def _write(trained: Any, run: Path, checkpoint: str, tmp: ExportDir, weights: dict[str, torch.Tensor],
           names: dict[str, list[str]], latents: dict[str, Any]) -> None:
    """Every file of the export into `tmp`; byte for byte the same for the same checkpoint."""
    cfg, state = trained.cfg, trained.state
    tmp.path.mkdir(parents=True)
    # one metadata key: safetensors writes its metadata map in a random order, so two keys would make 1 in 2
    # re-exports differ (the version is config.json's m3jepa_version)
    save_file(weights, str(tmp.weights), metadata={"format": "pt"})
    if trained.adapters is not None:
        shutil.copytree(trained.adapters, tmp.adapters)
    if latents:
        save_file({m: torch.from_numpy(v) for m, v in latents.items()}, str(tmp.vocabularies))
    metrics = _metrics(run)
    meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "m3jepa_version": __version__,
        "architecture": f"M3JepaPredictor ({cfg.model.predictor}, gates={cfg.model.gates})",
        "dims": dict(trained.dims),
        "directions": list(state.directions),
        "encoders": _encoders(trained.encoders, trained.dims, cfg.encode.dtype),
        "vocabularies": names,
        "pipeline": to_dict(cfg),
        "trained": {"run": str(run.resolve()), "checkpoint": checkpoint, "step": state.step,
                    "best_step": state.best_step, "best_val_mean_r1": state.best_metric},
        "metrics": metrics,
    }
    tmp.config.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    atomic_write_text(tmp.model_card, model_card(meta, run, checkpoint))
    write_export_checksums(tmp.path, meta)
    _share(tmp.path)


def _share(folder: Path) -> None:
    """Every file 0644 and every folder 0755: safetensors (and adapter copies) keep the private 0600 a
    checkpoint may have, which would keep the export from the people it is for."""
    folder.chmod(0o755)
    for p in folder.rglob("*"):
        p.chmod(0o755 if p.is_dir() else FILE_MODE)


def _encoders(stores: dict[str, dict[str, str]], dims: dict[str, int], dtype: str) -> dict[str, Any]:
    return {m: {"encoder": s["encoder"], "revision": s["revision"], "dim": dims[m], "store_dtype": dtype}
            for m, s in stores.items()}


def _metrics(run: Path) -> dict[str, Any] | None:
    """The run's metrics.json (what `m3jepa evaluate` wrote), when it has been evaluated."""
    path = RunDir(run).metrics()
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def model_card(meta: dict[str, Any], run: Path, checkpoint: str) -> str:
    """README.md of an export: the model, its training, its metrics and how to use it."""
    p = meta["pipeline"]
    lines = [
        "---",
        "library_name: m3jepa",
        "tags: [m3-jepa, multimodal, retrieval, mixture-of-experts]",
        "---",
        "",
        f"# M3-JEPA predictor: {p.get('name', 'run')}",
        "",
        f"A multi-gate mixture-of-experts predictor ({meta['architecture']}) that aligns frozen encoders'",
        "latents in a shared space (M3-JEPA, ICML 2025). It holds only the predictor: the encoders below",
        "are loaded by name when raw inputs are embedded.",
        "",
        "| modality | encoder | revision | latent dim |",
        "|---|---|---|---|",
        *[f"| {m} | {e['encoder']} | {e['revision']} | {e['dim']} |"
          for m, e in sorted(meta["encoders"].items())],
        "",
        f"Directions: {', '.join(meta['directions'])}. Dataset: `{p['encode']['dataset']}`.",
        "",
        "## Training",
        "",
        f"Trained with `m3jepa train-predictor` on the stores of `{p['encode']['dataset']}` (the resolved",
        "config is `pipeline` in config.json); exported from checkpoint "
        f"`{checkpoint}` (step {meta['trained']['step']}) of `{run}` with",
        "",
        f"    m3jepa export --run {run} --out DIR --checkpoint {checkpoint}",
        "",
    ]
    lines += _metrics_section(meta.get("metrics"), run)
    lines += [
        "## Use",
        "",
        "```python",
        "import m3jepa",
        "",
        'model = m3jepa.load("DIR", device="auto")',
        f"print(model.directions)  # {meta['directions']}",
        "```",
        "",
        "See m3jepa's docs/api.md for embedding, search, classification and VQA.",
        "",
    ]
    return "\n".join(lines)


def _metrics_section(metrics: dict[str, Any] | None, run: Path) -> list[str]:
    if not metrics:
        return ["## Metrics", "", f"Not evaluated: run `m3jepa evaluate --run {run}` before exporting.", ""]
    out = [
        "## Metrics",
        "",
        f"Measured by `m3jepa evaluate --run {run}` on split `{metrics.get('split')}` "
        f"(protocol `{metrics.get('protocol')}`, space `{metrics.get('headline_space')}`):",
        "",
        "| direction | R@1 | R@5 | R@10 |",
        "|---|---|---|---|",
    ]
    for d, r in metrics.get("directions", {}).items():
        out.append(f"| {d} | {r.get('R@1', 0):.2f} | {r.get('R@5', 0):.2f} | {r.get('R@10', 0):.2f} |")
    return [*out, ""]
