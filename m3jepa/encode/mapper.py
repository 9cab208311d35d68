"""Stage-1 encoding: a shard's decoded batches through the frozen encoder into its rows' features."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from m3jepa.config import EncodeConfig
from m3jepa.data.records import BadItemError
from m3jepa.encode.jobs import SKIP_HINT, StoreJob
from m3jepa.encode.reader import Batch, DecodedShard
from m3jepa.encode.summary import StoreResult
from m3jepa.encoders.base import Encoder, EncoderError
from m3jepa.store.manifest import RAGGED_KINDS

log = logging.getLogger(__name__)


@dataclass
class ShardOutput:
    """One encoded shard: features (n, D) in row order (bad rows zero), per-row tokens, skipped rows."""

    index: int
    features: np.ndarray  # (n, D)
    tokens: list[np.ndarray | None]  # n x (T_i, width) for ragged kinds, else all None
    skipped: list[dict[str, Any]]  # {row_id, sample_id, reason}

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + sum(t.nbytes for t in self.tokens if t is not None)


class Mapper:
    """Runs the encoder over each decoded shard; bad rows stop the run, or with skip_bad become zero rows.

    Adds the seconds spent waiting for decoded batches (read_s) and in the forward pass (compute_s) to
    the StoreResult it is given.
    """

    def __init__(self, encoder: Encoder, kind: str, skip_bad: bool, where: str):
        self.encoder, self.kind, self.skip_bad, self.where = encoder, kind, skip_bad, where

    def __call__(self, shard: DecodedShard, result: StoreResult, bar: Any = None) -> ShardOutput:
        work = shard.work
        n = work.hi - work.lo
        features = np.zeros((n, self.encoder.spec.dim), dtype=np.float32)  # (n, D); bad rows stay zero
        tokens: list[np.ndarray | None] = [None] * n
        skipped: list[dict[str, Any]] = []
        tick = time.perf_counter()
        for batch in shard.batches:
            result.read_s += time.perf_counter() - tick
            skipped += self.bad_rows(shard, batch)
            if batch.rows:
                tick = time.perf_counter()
                self.encode_batch(batch, work.lo, features, tokens)
                result.compute_s += time.perf_counter() - tick
            if bar is not None:
                bar.update(len(batch.rows) + len(batch.bad))
            tick = time.perf_counter()
        return ShardOutput(work.index, features, tokens, skipped)

    def bad_rows(self, shard: DecodedShard, batch: Batch) -> list[dict[str, Any]]:
        """The skipped-row entries of a batch's bad rows; without skip_bad the first is a BadItemError."""
        out = []
        for row, reason in batch.bad:
            record = shard.work.records[row - shard.work.lo]
            if not self.skip_bad:
                # Raised before this shard is written: the committed shards stay, so a rerun resumes.
                raise BadItemError(record.sample_id, f"{reason} ({self.where} row {row}); {SKIP_HINT}")
            log.warning("skipping %s (%s row %d): %s", record.sample_id, self.where, row, reason)
            out.append({"row_id": row, "sample_id": record.sample_id, "reason": reason})
        return out

    def encode_batch(self, batch: Batch, lo: int, features: np.ndarray,
                     tokens: list[np.ndarray | None]) -> None:
        """Encode one batch and put each row's result at its position in the shard."""
        with torch.inference_mode():
            out = self.encoder.encode(batch.inputs, self.kind)
        positions = [row - lo for row in batch.rows]  # batch order → shard positions (restores row order)
        features[positions] = out.pooled.float().cpu().numpy()  # (b, D)
        if self.kind in RAGGED_KINDS:
            for p, t in zip(positions, out.tokens, strict=True):
                tokens[p] = t.float().cpu().numpy()  # (T_i, D) or, for prefix, (T_i, D_state)


def load_encoder(job: StoreJob, cfg: EncodeConfig, device: torch.device, dtype: torch.dtype) -> Encoder:
    """The job's encoder; for kind = prefix seen through its layer stack, checked against the manifest."""
    encoder = job.spec.factory(device, dtype)
    if cfg.kind != "prefix":
        return encoder
    from m3jepa.encoders.layers import PrefixEncoder, StackGeometry

    wrapped = PrefixEncoder(encoder, cfg.tunable_layers)
    m = job.manifest
    planned = StackGeometry(m.layer_index, m.tunable_layers, m.state_dim,  # type: ignore[arg-type]
                            tuple(m.state_grid) if m.state_grid else None)  # type: ignore[arg-type]
    if wrapped.stack.geometry != planned:
        raise EncoderError(f"{job.spec.name}: the loaded model's layer stack {wrapped.stack.geometry} "
                           f"disagrees with the one planned from its config, {planned}")
    return wrapped
