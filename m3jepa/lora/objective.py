"""The LoRA objective: tunable encoder tails before the predictor, and what a run saves and reloads."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m3jepa.config import LoraConfig, PipelineConfig
from m3jepa.core.device import to_device
from m3jepa.core.directions import parse_direction
from m3jepa.core.errors import StoreDataError
from m3jepa.core.layout import ADAPTERS
from m3jepa.core.objective import Objective
from m3jepa.core.paired import PairedSplit
from m3jepa.distributed import DistInfo
from m3jepa.lora.tunable import FAMILY_TARGETS, TunableEncoder, encoder_family, resolve_targets, tail_for
from m3jepa.store import open_store
from m3jepa.store.reader import pad_rows

log = logging.getLogger(__name__)

# <checkpoint>/adapters/<modality>/: peft's adapter_config.json + adapter_model.safetensors (core/layout.py)


@dataclass
class PrefixBatch:
    """A batch of prefix states for one tuned modality, as read from its prefix store."""

    states: Tensor  # (B, T, D_state) float32
    mask: Tensor  # (B, T) bool, True on real positions

    def float(self) -> PrefixBatch:
        """Already float32: PairedSplit.batch casts every batch, and a PrefixBatch passes as it is."""
        return self


class LoraObjective(Objective):
    """Objective whose tuned modalities arrive as PrefixBatch and pass through their LoRA-wrapped tails.

    Its state dict holds the predictor, the loss and the adapters, never the tails' frozen weights
    (those come from the encoder's own weight file): a checkpoint stays as small as the trainable part.
    """

    def __init__(self, objective: Objective, tails: dict[str, TunableEncoder], stop_grad_target: bool):
        nn.Module.__init__(self)
        self.predictor = objective.predictor
        self.loss = objective.loss
        self.encoders = nn.ModuleDict(tails)
        self.stop_grad_target = stop_grad_target
        self.sources: dict[str, dict[str, Any]] = {}  # split → modality → row source

    def latent(self, modality: str, value: Tensor | PrefixBatch) -> Tensor:
        """Pooled latents (B, D_m): through the modality's tail for a PrefixBatch, as given otherwise."""
        if isinstance(value, PrefixBatch):
            return self.encoders[modality](value.states, value.mask)  # (B, D_m)
        return value

    def forward(self, direction: str, x: Any, y: Any, dist_info: DistInfo | None = None,
                pred_target: Tensor | None = None) -> Any:
        source, target = parse_direction(direction)
        x = {m: self.latent(m, v) for m, v in x.items()} if isinstance(x, dict) else self.latent(source, x)
        y = self.latent(target, y)  # (B, D_target), with gradient into the target's adapters
        detached = y.detach() if self.stop_grad_target else None
        return super().forward(direction, x, y, dist_info, pred_target=detached)

    def _frozen(self, key: str) -> bool:
        return ".encoders." in f".{key}" and "lora_" not in key

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:  # type: ignore[override]
        full = super().state_dict(*args, **kwargs)
        return type(full)((k, v) for k, v in full.items() if not self._frozen(k))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._frozen(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"LoRA objective: missing keys {missing[:3]}, unexpected "
                               f"{list(result.unexpected_keys)[:3]}")
        return result

    def view(self, data: PairedSplit) -> PairedSplit:
        """`data` with its tuned modalities re-encoded by the current tails (for validation)."""
        return tuned_split(data, self.encoders, self.sources[data.split])

    def save_adapters(self, directory: Path) -> None:
        """<directory>/adapters/<modality>/ in peft's format, one per tuned modality."""
        for m, tail in self.encoders.items():
            tail.save_adapters(directory / ADAPTERS / m)


def attach_lora(
    cfg: PipelineConfig, objective: Objective, train: PairedSplit, val: PairedSplit, device: torch.device
) -> LoraObjective:
    """Wrap `objective` with the tuned modalities' tails on `device`; the training split's batches of those
    modalities become PrefixBatch (ModalityFeatures.prefix), and validation re-encodes through the tails."""
    log.info("%s", lora_settings(cfg.lora))
    lora = LoraObjective(objective, build_tails(cfg, train, device), cfg.lora.stop_grad_target)
    for split in (train, val):
        lora.sources[split.split] = row_sources(cfg, split, dict(lora.encoders.items()))
    for m, source in lora.sources[train.split].items():
        train.modalities[m].prefix = source
    return lora


# ---------------------------------------------------------------- which modalities, which tails


def tuned_modalities(cfg: PipelineConfig, data: PairedSplit) -> dict[str, str]:
    """modality → encoder name of the modalities LoRA tunes (explicit list, else every one that can be)."""
    from m3jepa.encoders import get_encoder_spec
    from m3jepa.encoders.base import EncoderError

    lora = cfg.lora
    chosen: dict[str, str] = {}
    for m, feats in data.modalities.items():
        if lora.modalities and m not in lora.modalities:
            continue
        try:
            family = encoder_family(get_encoder_spec(feats.encoder))
        except EncoderError as e:
            family, why = None, str(e)
        if family and resolve_targets(family, lora.targets):
            chosen[m] = feats.encoder
            continue
        if family:
            why = (f"its {family} layers have none of lora.targets {lora.targets} "
                   f"(it has: {', '.join(FAMILY_TARGETS[family]) or 'none peft can wrap'})")
        if lora.modalities:
            raise StoreDataError(f"lora.modalities names {m!r}, but {feats.encoder} cannot be tuned: {why}")
        log.info("LoRA leaves %s (%s) frozen: %s", m, feats.encoder, why)
    missing = sorted(set(lora.modalities) - set(data.modalities))
    if missing:
        raise StoreDataError(f"lora.modalities names {missing}, which train.directions do not use")
    if not chosen:
        raise StoreDataError(f"lora.enabled, but no modality of {sorted(data.modalities)} can be tuned "
                             f"with lora.targets {lora.targets}")
    return chosen


def build_tails(cfg: PipelineConfig, data: PairedSplit, device: torch.device) -> dict[str, TunableEncoder]:
    """The LoRA-wrapped tails of the tuned modalities on `device`, checked against their stores' manifests."""
    from m3jepa.encoders import get_encoder_spec
    from m3jepa.store.manifest import load_manifest

    tails = {}
    for m, name in tuned_modalities(cfg, data).items():
        spec = get_encoder_spec(name)
        manifest = load_manifest(data.modalities[m].store)
        if spec.revision != manifest.encoder_revision:
            raise StoreDataError(
                f"{data.modalities[m].store} was encoded with {name} revision {manifest.encoder_revision}, "
                f"but the installed encoder is {spec.revision}: re-encode, or install the encoder it used"
            )
        tails[m] = tail_for(spec, m, cfg.lora, device)
        if cfg.lora.layers != "all":  # the tail must start where the store's states were cut
            _check_geometry(tails[m], manifest, data.modalities[m].store)
    return tails


def _check_geometry(tail: TunableEncoder, manifest: Any, store: Path) -> None:
    g = tail.info.geometry
    if (manifest.kind, manifest.layer_index, manifest.state_dim) != ("prefix", g.layer_index, g.state_dim):
        raise StoreDataError(
            f"{store}: a {manifest.kind} store cut at layer {manifest.layer_index} "
            f"(width {manifest.state_dim}), but the tail starts at layer {g.layer_index} "
            f"(width {g.state_dim}); re-encode with --kind prefix --tunable-layers {g.tunable_layers}"
        )


# ---------------------------------------------------------------- latents of whole splits


def tuned_split(data: PairedSplit, tails: Any, sources: dict[str, Any], batch_rows: int = 256) -> PairedSplit:
    """A copy of `data` whose tuned modalities' features are their tails' current latents (no grad).

    `tails` maps modality → TunableEncoder (a dict or the objective's ModuleDict). Validation and
    evaluation score these latents exactly as they score frozen features.
    """
    mods = dict(data.modalities)
    for m, tail in tails.items():
        was = tail.training
        tail.train(False)
        try:
            mods[m] = dataclasses.replace(data.modalities[m], features=_latents(data, m, tail, sources[m],
                                                                                 batch_rows))
        finally:
            tail.train(was)
    return dataclasses.replace(data, modalities=mods)


def _latents(data: PairedSplit, m: str, tail: TunableEncoder, source: Any, batch_rows: int) -> Tensor:
    feats = data.modalities[m]
    device = tail.stack.device  # the tail's (materialised) layers: the run's device
    # (N, D) on the tail's device; rows skipped at encode time stay 0, as they are never scored
    out = torch.zeros((len(feats.valid), feats.dim), dtype=torch.float32, device=device)
    rows = np.flatnonzero(feats.valid)
    for lo in range(0, len(rows), batch_rows):
        ids = rows[lo: lo + batch_rows]
        batch = to_device(source(ids), device)
        with torch.no_grad():
            out[torch.from_numpy(ids).to(device)] = tail(batch.states, batch.mask)
    return out


def prefix_tensors(store: Any, row_ids: np.ndarray) -> tuple[Tensor, Tensor]:
    """(states (B, T, D_state) float32, mask (B, T) bool) of `row_ids` from a prefix store."""
    states, mask = store.read_prefix(row_ids)
    return torch.from_numpy(states), torch.from_numpy(mask)


def lora_from_checkpoint(
    cfg: PipelineConfig, data: PairedSplit, checkpoint: Path, device: torch.device
) -> dict[str, TunableEncoder]:
    """Rebuild the tails of a checkpoint's run on `device` and load its adapters (peft format) into them."""
    tails = build_tails(cfg, data, device)
    for m, tail in tails.items():
        tail.load_adapters(checkpoint / ADAPTERS / m)
    return tails


def lora_settings(lora: LoraConfig) -> str:
    """One line for logs: the LoRA settings in use."""
    return (f"LoRA layers={lora.layers} r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} "
            f"targets={','.join(lora.targets)}")


# ---------------------------------------------------------------- where a tuned modality's rows come from


# A prefix store whose states fit in this many bytes is read once into memory (Tux Paint's MiniLM
# store: 6.8 MB); a larger one is read per batch, so memory stays bounded.
PREFIX_CACHE_BYTES = 1 << 30


class StorePrefixSource:
    """Rows of a prefix store: the states entering the tail, from memory when small, else per batch."""

    def __init__(self, path: Path) -> None:
        self.store = open_store(path)
        m = self.store.manifest
        size = int(self.store.token_counts().sum()) * int(m.token_width) * np.dtype(m.dtype).itemsize
        self.rows: list[np.ndarray] | None = None
        if size <= PREFIX_CACHE_BYTES:
            ids = np.flatnonzero(np.asarray(self.store.rows.valid, dtype=bool))
            self.rows = [np.empty((0, m.token_width), np.float16)] * len(self.store)
            for i, r in zip(ids.tolist(), self.store.read_tokens(ids, dtype=None), strict=True):
                self.rows[i] = r  # (T_i, D_state) stored dtype

    def __call__(self, row_ids: np.ndarray) -> PrefixBatch:
        if self.rows is None:
            return PrefixBatch(*prefix_tensors(self.store, row_ids))
        rows = [self.rows[int(i)] for i in row_ids]
        states, mask = pad_rows(rows, self.store.manifest.token_width, np.float32)  # as read_prefix pads
        return PrefixBatch(torch.from_numpy(states), torch.from_numpy(mask))


class RawSource:
    """lora.layers = "all": rows decoded from the raw dataset and run through the encoder's front alone
    (its embeddings, which hold no LoRA target), so every layer trains. The slow path."""

    def __init__(self, records: list[Any], tail: TunableEncoder) -> None:
        self.records = records
        self.stack = tail.stack
        self.preprocessor = tail.stack.encoder.preprocessor

    def __call__(self, row_ids: np.ndarray) -> PrefixBatch:
        pre = self.preprocessor
        batch = pre.collate([pre(self.records[int(i)].payload) for i in row_ids])
        states = self.stack.prefix(batch)  # no grad: the embeddings are frozen
        return PrefixBatch(states.states, states.mask.bool())


def row_sources(cfg: PipelineConfig, data: PairedSplit, tails: dict[str, TunableEncoder]) -> dict[str, Any]:
    """modality → callable(row ids) → PrefixBatch, for each tuned modality of this split."""
    if cfg.lora.layers != "all":
        return {m: StorePrefixSource(data.modalities[m].store) for m in tails}
    return {m: RawSource(_records(cfg, data, m), tail) for m, tail in tails.items()}


def _records(cfg: PipelineConfig, data: PairedSplit, modality: str) -> list[Any]:
    """The raw records behind a store's rows, in row order; refused when they are not the same rows."""
    from m3jepa.data import get_dataset
    from m3jepa.data.records import membership_fingerprint
    from m3jepa.store.manifest import load_manifest

    enc = cfg.encode
    dataset = get_dataset(enc.dataset, enc.root, seed=enc.seed, limit=enc.limit, skip_bad=enc.skip_bad)
    records = dataset.records(data.split, modality)
    store = data.modalities[modality].store
    if membership_fingerprint(records) != load_manifest(store).membership:
        raise StoreDataError(f"{store} holds other rows than dataset {enc.dataset!r} split {data.split!r} "
                             f"now gives; re-encode the split")
    return records
