"""Who made a vector: the model (path, checkpoint, weights sha256) and the store (checksum) it came from."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from m3jepa.core.directions import parse_direction
from m3jepa.core.layout import WEIGHTS, ExportDir, RunDir
from m3jepa.search.errors import SearchError
from m3jepa.store.manifest import Manifest


@dataclass(frozen=True)
class ModelRef:
    """The model a store or index was made with: enough to load it again and to tell it changed."""

    path: str  # the run directory or export folder, resolved
    kind: str  # "run" | "export"
    checkpoint: str | None  # best | latest for a run, None for an export
    weights_sha256: str

    @property
    def encoder(self) -> str:
        """The embedded store's `encoder` field: `m3jepa:<path>@<checkpoint>` (`@export` for an export)."""
        return f"m3jepa:{self.path}@{self.checkpoint or 'export'}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: Path) -> ModelRef:
        try:
            return cls(str(data["path"]), str(data["kind"]), data.get("checkpoint"),
                       str(data["weights_sha256"]))
        except (TypeError, KeyError) as e:
            raise SearchError(f"{where}: the model record is malformed ({e!r}); rebuild it") from None


def weights_file(path: Path, kind: str, checkpoint: str | None) -> Path:
    """The weights file of a run's checkpoint or of an export (core/layout.py)."""
    return RunDir(path).checkpoint(str(checkpoint)) / WEIGHTS if kind == "run" else ExportDir(path).weights


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_ref(model: Any) -> ModelRef:
    """The ModelRef of a loaded `M3Model` (its `.source`): the sha256 of its weights as verified when they
    were loaded, else (a model without the record) of its weights file."""
    src = model.source
    path = Path(src.path).resolve()
    recorded = getattr(model, "weights_sha256", None)
    if recorded:
        return ModelRef(str(path), src.kind, src.checkpoint, recorded)
    weights = weights_file(path, src.kind, src.checkpoint)
    if not weights.is_file():
        raise SearchError(f"{weights} is missing: the model at {path} has no weights file to name")
    return ModelRef(str(path), src.kind, src.checkpoint, file_sha256(weights))


def load_model(ref: ModelRef, device: str = "auto", where: Path | None = None,
               query_encoder_precision: str = "fp32") -> Any:
    """Load the model `ref` names, refused when its weights changed since `where` was built with it
    (`query_encoder_precision`: m3jepa.load's)."""
    from m3jepa.api import load

    path = Path(ref.path)
    weights = weights_file(path, ref.kind, ref.checkpoint)
    if not weights.is_file():
        raise SearchError(f"{where}: the model it was built with, {weights}, is missing; rebuild it with "
                          "a model that exists")
    if file_sha256(weights) != ref.weights_sha256:
        raise SearchError(f"{where}: the weights of {path} changed since it was built (sha256 differs); "
                          "rebuild it with `m3jepa embed --force` / `m3jepa index --force`")
    return load(path, checkpoint=ref.checkpoint or "best", device=device,
                query_encoder_precision=query_encoder_precision)


def targets(directions: list[str]) -> set[str]:
    """The modalities some direction predicts: the galleries the model can search."""
    return {parse_direction(d)[1] for d in directions}


def sources_into(directions: list[str], target: str) -> list[str]:
    """The single-modality sources of the directions into `target` (image+question->answer is left out:
    one query value cannot feed it)."""
    out = []
    for d in directions:
        src, tgt = parse_direction(d)
        if tgt == target and isinstance(src, str):
            out.append(src)
    return out


def store_checksum(manifest: Manifest) -> str:
    """sha256 over a complete store's rows_sha256 and shard checksums: its bytes' identity, cheaply."""
    h = hashlib.sha256(f"{manifest.rows_sha256}\n".encode())
    for s in manifest.shards:
        h.update(f"{s.index} {s.row_start} {s.row_end} {s.sha256}\n".encode())
    return h.hexdigest()
