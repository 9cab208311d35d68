"""The LoRA objective: tunable encoder tails before the predictor, and what a run saves and reloads."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from m3jepa.config import LoraConfig, PipelineConfig
from m3jepa.lora.tunable import FAMILY_TARGETS, TunableEncoder, build_tunable, resolve_targets
from m3jepa.train.data import PairedSplit, StoreDataError, parse_direction
from m3jepa.train.distributed import DistInfo
from m3jepa.train.objective import Objective

log = logging.getLogger(__name__)

# <checkpoint>/adapters/<modality>/: peft's adapter_config.json + adapter_model.safetensors
ADAPTERS = "adapters"


@dataclass
class PrefixBatch:
    """A batch of prefix states for one tuned modality, as read from its prefix store."""

    states: Tensor  # (B, T, D_state) float32
    mask: Tensor  # (B, T) bool, True on real positions


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

    def save_adapters(self, directory: Path) -> None:
        """<directory>/adapters/<modality>/ in peft's format, one per tuned modality."""
        for m, tail in self.encoders.items():
            tail.save_adapters(directory / ADAPTERS / m)


# ---------------------------------------------------------------- which modalities, which tails


def tuned_modalities(cfg: PipelineConfig, data: PairedSplit) -> dict[str, str]:
    """modality → encoder name of the modalities LoRA tunes (explicit list, else every one that can be)."""
    from m3jepa.encoders import get_encoder_spec
    from m3jepa.encoders.layers import stack_geometry

    lora = cfg.lora
    chosen: dict[str, str] = {}
    for m, feats in data.modalities.items():
        if lora.modalities and m not in lora.modalities:
            continue
        family, reason = _family(get_encoder_spec(feats.encoder), stack_geometry)
        if family and resolve_targets(family, lora.targets):
            chosen[m] = feats.encoder
            continue
        why = reason or f"its {family} layers have none of lora.targets {lora.targets} " \
                        f"(it has: {', '.join(FAMILY_TARGETS[family]) or 'none peft can wrap'})"
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


def _family(spec: Any, stack_geometry: Any) -> tuple[str | None, str | None]:
    """The target family of an encoder from its name and config alone (no weights)."""
    from m3jepa.encoders.base import EncoderError

    if spec.name == "efficientnet-lite0":
        return "efficientnet", None
    try:
        stack_geometry(spec, 1)
    except EncoderError as e:
        return None, str(e)
    from m3jepa.encoders.layers import _model_dir
    from m3jepa.encoders.registry import read_config

    model_type = read_config(_model_dir(spec)).get("model_type")
    if model_type == "dinov2":
        return "dinov2", None
    if model_type in ("bert", "roberta", "xlm-roberta", "mpnet"):
        return "bert", None
    return "llama", None


def build_tails(cfg: PipelineConfig, data: PairedSplit) -> dict[str, TunableEncoder]:
    """The LoRA-wrapped tails of the tuned modalities, checked against their stores' manifests."""
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
        if cfg.lora.layers == "all":
            full = spec.factory(torch.device("cpu"), torch.float32)  # the slow path: the whole encoder
            tails[m] = build_tunable(spec, m, cfg.lora, None, full)
        else:
            tail = build_tunable(spec, m, cfg.lora, int(cfg.lora.layers))
            _check_geometry(tail, manifest, data.modalities[m].store)
            tails[m] = tail
    return tails


def _check_geometry(tail: TunableEncoder, manifest: Any, store: Path) -> None:
    g = tail.info.geometry
    if (manifest.kind, manifest.layer_index, manifest.state_dim) != ("prefix", g.layer_index, g.state_dim):
        raise StoreDataError(
            f"{store}: a {manifest.kind} store cut at layer {manifest.layer_index} "
            f"(width {manifest.state_dim}), but the tail starts at layer {g.layer_index} "
            f"(width {g.state_dim}); re-encode with --kind prefix --tunable-layers {g.tunable_layers}"
        )


def parameter_report(objective: nn.Module) -> dict[str, Any]:
    """Exactly what trains: counts per part and every trainable parameter's name and shape."""
    named = [(n, p) for n, p in objective.named_parameters() if p.requires_grad]
    parts: dict[str, int] = {}
    for n, p in named:
        key = ".".join(n.split(".")[:2]) if n.startswith("encoders.") else n.split(".")[0]
        parts[key] = parts.get(key, 0) + p.numel()
    frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad and p.device.type != "meta")
    return {
        "trainable": sum(p.numel() for _, p in named),
        "frozen_loaded": frozen,
        "parts": parts,
        "parameters": {n: list(p.shape) for n, p in named},
    }


def write_parameter_report(objective: nn.Module, path: Path) -> dict[str, Any]:
    """Write parameter_report() as JSON and log its summary."""
    report = parameter_report(objective)
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    log.info("trainable parameters: %s in total; %s; frozen tail weights loaded: %s",
             f"{report['trainable']:,}", ", ".join(f"{k} {v:,}" for k, v in report["parts"].items()),
             f"{report['frozen_loaded']:,}")
    return report


# ---------------------------------------------------------------- latents of whole splits


def tuned_split(data: PairedSplit, objective: LoraObjective, sources: dict[str, Any],
                batch_rows: int = 256) -> PairedSplit:
    """A copy of `data` whose tuned modalities' features are their tails' current latents (no grad).

    Validation and evaluation score these exactly as they score frozen features.
    """
    mods = dict(data.modalities)
    was = objective.training
    objective.eval()
    try:
        for m, tail in objective.encoders.items():
            feats = data.modalities[m]
            # (N, D); rows skipped at encode time stay 0, as they are never scored
            out = torch.zeros((len(feats.valid), feats.dim), dtype=torch.float32)
            rows = np.flatnonzero(feats.valid)
            for lo in range(0, len(rows), batch_rows):
                ids = rows[lo: lo + batch_rows]
                batch = sources[m](ids)
                with torch.no_grad():
                    out[torch.from_numpy(ids)] = tail(batch.states, batch.mask)
            mods[m] = dataclasses.replace(feats, features=out)
    finally:
        objective.train(was)
    return dataclasses.replace(data, modalities=mods)


def prefix_tensors(store: Any, row_ids: np.ndarray) -> tuple[Tensor, Tensor]:
    """(states (B, T, D_state) float32, mask (B, T) bool) of `row_ids` from a prefix store."""
    states, mask = store.read_prefix(row_ids)
    return torch.from_numpy(states), torch.from_numpy(mask)


def lora_from_checkpoint(
    cfg: PipelineConfig, data: PairedSplit, checkpoint: Path
) -> dict[str, TunableEncoder]:
    """Rebuild the tails of a checkpoint's run and load its adapters (peft format) into them."""
    tails = build_tails(cfg, data)
    for m, tail in tails.items():
        tail.load_adapters(checkpoint / ADAPTERS / m)
    return tails


def lora_settings(lora: LoraConfig) -> str:
    """One line for logs: the LoRA settings in use."""
    return (f"LoRA layers={lora.layers} r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} "
            f"targets={','.join(lora.targets)}")


# ---------------------------------------------------------------- where a tuned modality's rows come from


class StorePrefixSource:
    """Rows of a prefix store: the states entering the tail, read per batch."""

    def __init__(self, path: Path) -> None:
        from m3jepa.store import open_store

        self.store = open_store(path)

    def __call__(self, row_ids: np.ndarray) -> PrefixBatch:
        return PrefixBatch(*prefix_tensors(self.store, row_ids))


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


def lora_batch(
    data: PairedSplit, sources: dict[str, Any], direction: str, idx: np.ndarray
) -> tuple[Any, Any]:
    """(x, y) of pair indices `idx`: PrefixBatch for tuned modalities, float32 features for the others."""
    rows_s, rows_t = data.pairs[direction]
    src, tgt = parse_direction(direction)

    def take(m: str, rows: np.ndarray) -> Any:
        if m in sources:
            return sources[m](rows)
        return data.modalities[m].features[torch.from_numpy(rows)].float()  # (b, D_m)

    if isinstance(src, str):
        x = take(src, rows_s[idx])
    else:  # rows_s is (P, S): column j holds the rows of store src[j]
        x = {m: take(m, rows_s[idx, j]) for j, m in enumerate(src)}
    return x, take(tgt, rows_t[idx])
