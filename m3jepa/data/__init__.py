"""Datasets: deterministic records with ids, groups and seeded splits (stage 1 input)."""

from __future__ import annotations

import importlib

from m3jepa.data.records import Dataset, DatasetError

# name → (module, loader); modules are imported only when their dataset is asked for.
_LOADERS = {
    "tuxpaint": ("m3jepa.data.tuxpaint", "load_tuxpaint"),
    "coco": ("m3jepa.data.coco", "load_coco"),
    "flickr30k": ("m3jepa.data.flickr30k", "load_flickr30k"),
    "jsonl": ("m3jepa.data.jsonl", "load_jsonl"),
}

_PAPER_ENCODERS = {"image": "dinov2-large", "text": "llama3-8b"}
_SMALL_ENCODERS = {"image": "efficientnet-lite0", "text": "minilm-l6"}

# The encoders each dataset is embedded with when the config names none.
DEFAULT_ENCODERS: dict[str, dict[str, str]] = {
    "tuxpaint": dict(_SMALL_ENCODERS),
    "coco": dict(_PAPER_ENCODERS),
    "flickr30k": dict(_PAPER_ENCODERS),
    "jsonl": dict(_SMALL_ENCODERS),
}


def list_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_LOADERS)


def get_dataset(
    name: str, root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> Dataset:
    """Load dataset `name` from `root` (None: its default); `limit` keeps the first N groups per split."""
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    module, loader = _LOADERS[name]
    return getattr(importlib.import_module(module), loader)(root, seed=seed, limit=limit, skip_bad=skip_bad)


__all__ = ["DEFAULT_ENCODERS", "Dataset", "DatasetError", "get_dataset", "list_datasets"]
