"""The `onehot` label encoder: a class name becomes the one-hot vector of its index in the class list."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from m3jepa.data.records import BadItemError
from m3jepa.encoders.base import EncodedBatch, EncoderError, EncoderSpec
from m3jepa.encoders.hf import check_kind

log = logging.getLogger(__name__)

NAME = "onehot"
UNBOUND = "unbound"  # the revision of the registry's placeholder spec, before a class list is known


def class_revision(classes: Sequence[str]) -> str:
    """sha256 over the ordered class list: stores of different class lists never mix (manifest check)."""
    h = hashlib.sha256()
    for c in classes:
        h.update(c.encode("utf-8"))
        h.update(b"\n")
    return f"classes:{len(classes)}:sha256:{h.hexdigest()[:16]}"


def check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """The class list as a sorted tuple; EncoderError when it is empty, unsorted, or repeats a name."""
    out = tuple(classes)
    if not out:
        raise EncoderError(f"{NAME}: the class list is empty; the dataset has no label records")
    if list(out) != sorted(set(out)):
        raise EncoderError(f"{NAME}: the class list must be sorted without repeats, got {list(out)[:5]}...")
    return out


def spec(classes: Sequence[str] | None = None) -> EncoderSpec:
    """The spec for a class list (dim = number of classes); without one, an unbound placeholder.

    The registry (`get_encoder_spec("onehot")`) returns the placeholder: its dimension comes from the
    dataset, so stage 1 binds it with `bind_to_dataset` before planning stores.
    """
    if classes is None:
        error = EncoderError(f"{NAME}: no class list bound; stage 1 binds it from the dataset "
                             " (bind_to_dataset)")
        return EncoderSpec(name=NAME, modality="label", dim=0, pooling="onehot", revision=UNBOUND,
                           layers="none", factory=functools.partial(_raise, error))
    bound = check_classes(classes)
    return EncoderSpec(name=NAME, modality="label", dim=len(bound), pooling="onehot",
                       revision=class_revision(bound), layers="none",
                       factory=functools.partial(OneHotEncoder, bound))


def dataset_classes(dataset: Any) -> list[str]:
    """The dataset's full class list: `dataset.classes()` when it has one, else the sorted label payloads.

    The full list, not the `limit`ed one, so a smoke run and a full run share the label dimension.
    """
    if hasattr(dataset, "classes"):
        return sorted(dataset.classes())
    found = {r.payload for split in dataset.splits() for r in dataset.records(split, "label")}
    return sorted(found)


def bind_to_dataset(label_spec: EncoderSpec, dataset: Any) -> EncoderSpec:
    """A label encoder's spec with its class list taken from `dataset` (already bound specs pass through)."""
    if label_spec.name != NAME or label_spec.revision != UNBOUND:
        return label_spec
    return spec(dataset_classes(dataset))


@dataclass(frozen=True)
class LabelPreprocessor:
    """Class name → {"index": ()} int64; holds the sorted class list, so it pickles into workers."""

    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        # a dict for O(1) lookups; built once per process (also after unpickling)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.classes)})

    def __getstate__(self) -> dict[str, Any]:
        return {"classes": self.classes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "classes", state["classes"])
        self.__post_init__()

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """The class index of one label; BadItemError naming a label outside the class list."""
        index = self._index.get(payload)  # type: ignore[attr-defined]
        if index is None:
            raise BadItemError(payload, f"label {payload!r} is not one of the {len(self.classes)} classes")
        return {"index": torch.tensor(index, dtype=torch.int64)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack the indices: {"index": (B,)}."""
        return {"index": torch.stack([it["index"] for it in items])}


class OneHotEncoder:
    """Pooled = the one-hot vector (B, K) float32; tokens = that vector as one token per row."""

    def __init__(self, classes: Sequence[str], device: torch.device, dtype: torch.dtype):
        self.spec = spec(classes)
        self.preprocessor = LabelPreprocessor(check_classes(classes))
        log.info("%s: %d classes (%s)", NAME, self.spec.dim, self.spec.revision)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """One-hot vectors of the collated class indices; always on CPU in float32 (exact)."""
        check_kind(kind)
        index = batch["index"].long()  # (B,)
        pooled = torch.nn.functional.one_hot(index, self.spec.dim).float()  # (B, K)
        tokens = list(pooled.unsqueeze(1).unbind(0)) if kind == "tokens" else None  # B x (1, K)
        return EncodedBatch(pooled=pooled, tokens=tokens)


def _raise(error: EncoderError, device: torch.device, dtype: torch.dtype) -> Any:
    raise error
