"""aiSFX (ISMIR 2022) from the offline `aisfx` package: a 512-d sound-effects encoder, frontend in numpy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3jepa.data.media import load_audio
from m3jepa.encoders.base import EncodedBatch, EncoderError, EncoderSpec
from m3jepa.encoders.hf import check_kind

log = logging.getLogger(__name__)

NAME = "aisfx"
DIM = 512
INSTALL_HINT = "pip install --no-deps aisfx==0.1.2 (model and weights load offline; librosa is not needed)"

# The constants of aisfx.inference: 44.1 kHz, 2048/1024 STFT, 96 HTK mel bands over 0-22050 Hz,
# log10(1e4 x + 1) compression, min-max normalised with the paper's training maximum.
SAMPLE_RATE = 44100
FRAME, HOP = 2048, 1024
MEL_BINS = 96
F_MIN, F_MAX = 0.0, 22050.0
NORM_MAX = 9.457798957824707  # aisfx.preprocessing.spectrogram_normalize('original'): mn = 0, mx = this
# Embedding blocks: 100 frames (about 2.3 s) with hop 50 (aisfx's default emb_hop_size = 0.5).
BLOCK, BLOCK_HOP = 100, 50
MAX_SECONDS = 30.0  # longer clips are cropped to their first 30 s (at most 24 blocks)
CHUNK = 64  # blocks per forward pass: bounds activation memory whatever the clip lengths


# ---------------------------------------------------------------- the frontend (numpy, runs in workers)


def hz_to_mel(freq: np.ndarray | float) -> np.ndarray:
    """HTK mel scale, 2595 log10(1 + f / 700) (essentia's 'htkMel')."""
    return 2595.0 * np.log10(1.0 + np.asarray(freq, dtype=np.float64) / 700.0)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of hz_to_mel."""
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int = SAMPLE_RATE, n_fft: int = FRAME, n_mels: int = MEL_BINS,
                   f_min: float = F_MIN, f_max: float = F_MAX) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) essentia MelBands weights: triangles in HTK-mel space, each summing to 1."""
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (n_mels + 2,)
    bins = np.arange(n_fft // 2 + 1) * (sample_rate / 2.0) / (n_fft // 2)  # bin frequencies in Hz
    m_bins, m_edges = hz_to_mel(bins), hz_to_mel(edges)
    rising = (m_bins[None, :] - m_edges[:-2, None]) / (m_edges[1:-1, None] - m_edges[:-2, None])
    falling = (m_edges[2:, None] - m_bins[None, :]) / (m_edges[2:, None] - m_edges[1:-1, None])
    weights = np.clip(np.minimum(rising, falling), 0.0, None)  # (n_mels, bins)
    return weights / weights.sum(axis=1, keepdims=True)  # 'unit_sum' normalisation


def frame_signal(wave: np.ndarray, frame: int = FRAME, hop: int = HOP) -> np.ndarray:
    """(n_frames, frame) as essentia's FrameCutter: first frame centred on sample 0, zero-padded,
    last frame the first whose centre reaches the end (n_frames = ceil(N / hop) + 1)."""
    n_frames = int(np.ceil(len(wave) / hop)) + 1
    padded = np.zeros((n_frames - 1) * hop + frame, dtype=np.float32)
    start = frame // 2  # frame k starts at sample k * hop - frame / 2
    padded[start:start + len(wave)] = wave[: len(padded) - start]
    return np.lib.stride_tricks.sliding_window_view(padded, frame)[::hop][:n_frames]


def log_mel(wave: np.ndarray, filterbank: np.ndarray | None = None) -> np.ndarray:
    """(n_frames, 96) normalised log-mel spectrogram, the input aisfx was trained on (essentia path)."""
    fb = mel_filterbank() if filterbank is None else filterbank
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FRAME) / (FRAME - 1))  # essentia's symmetric hann
    frames = frame_signal(wave) * window.astype(np.float32)  # (n_frames, 2048)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (n_frames, 1025); essentia type='power'
    mel = power @ fb.T.astype(power.dtype)  # (n_frames, 96)
    return (np.log10(1e4 * mel + 1.0) / NORM_MAX).astype(np.float32)


def to_blocks(spec: np.ndarray, block: int = BLOCK, hop: int = BLOCK_HOP) -> np.ndarray:
    """(n_blocks, block, bins) as aisfx.preprocessing.blocking(drop_partial_block=True).

    A clip shorter than one block gives one zero-padded block (aisfx itself asserts on clips under
    `hop` frames, about 1.2 s; zero is the normalised spectrogram of silence).
    """
    n_blocks = int(np.ceil((spec.shape[0] - block) / hop + 1))
    if (spec.shape[0] - block) % hop != 0:
        n_blocks -= 1  # the trailing partial block is dropped, as aisfx does
    n_blocks = max(n_blocks, 1)
    padded = np.concatenate([spec, np.zeros((block, spec.shape[1]), dtype=spec.dtype)])
    return np.stack([padded[i * hop:i * hop + block] for i in range(n_blocks)])


@dataclass(frozen=True)
class AisfxPreprocessor:
    """Path → {"blocks": (n_blocks, 100, 96)}: decode at 44.1 kHz mono, crop, log-mel, cut into blocks."""

    max_seconds: float = MAX_SECONDS

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """One clip's blocks; BadItemError if the file is missing, corrupt, empty or silent."""
        wave = load_audio(payload, sample_rate=SAMPLE_RATE, max_seconds=self.max_seconds)  # (N,)
        blocks = to_blocks(log_mel(wave, _filterbank()))
        return {"blocks": torch.from_numpy(np.ascontiguousarray(blocks))}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """All blocks end to end, (sum n_i, 100, 96), and each clip's count (B,)."""
        return {
            "blocks": torch.cat([it["blocks"] for it in items]),
            "counts": torch.tensor([len(it["blocks"]) for it in items], dtype=torch.long),
        }


_FB: np.ndarray | None = None


def _filterbank() -> np.ndarray:
    global _FB  # computed once per process (each DataLoader worker builds its own)
    if _FB is None:
        _FB = mel_filterbank()
    return _FB


# ---------------------------------------------------------------- spec and model


def weights_path() -> Path:
    """The packaged checkpoint (aisfx/models/checkpoint.pth); EncoderError naming the install command."""
    try:
        found = metadata.distribution("aisfx").locate_file("aisfx/models/checkpoint.pth")
    except metadata.PackageNotFoundError as e:
        raise EncoderError(f"{NAME} needs its package: {INSTALL_HINT}") from e
    path = Path(str(found))
    if not path.is_file():
        raise EncoderError(f"{NAME}: weights file {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def revision() -> str:
    """Package version + weight file name and size: cheap, and stable across runs."""
    path = weights_path()
    return f"aisfx=={metadata.version('aisfx')};{path.name}:{path.stat().st_size}"


def spec() -> EncoderSpec:
    """The registry entry; computing it loads no weights."""
    return EncoderSpec(name=NAME, modality="audio", dim=DIM, pooling="block-mean", revision=revision(),
                       layers="embedding_net", factory=AisfxEncoder)


class AisfxEncoder:
    """Pooled = mean over a clip's 2.3-s blocks of aisfx's block embedding; tokens = the blocks (n_i, 512)."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.spec = spec()
        self.device = device
        self.preprocessor = AisfxPreprocessor()
        # `dtype` is ignored: a 4.7M-parameter CNN with BatchNorm gains nothing from bf16
        self.model = _load_model(device)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Embed every block (in chunks), then average each clip's blocks: pooled (B, 512)."""
        check_kind(kind)
        blocks, counts = batch["blocks"], batch["counts"]  # (N, 100, 96), (B,)
        with torch.no_grad():
            parts = [self.model(blocks[i:i + CHUNK].to(self.device, torch.float32)).float().cpu()
                     for i in range(0, len(blocks), CHUNK)]
        per_block = torch.cat(parts)  # (N, 512)
        clip = torch.repeat_interleave(torch.arange(len(counts)), counts)  # (N,) clip index of each block
        pooled = torch.zeros(len(counts), DIM).index_add_(0, clip, per_block) / counts[:, None]  # (B, 512)
        tokens = list(per_block.split(counts.tolist())) if kind == "tokens" else None  # B x (n_i, 512)
        return EncodedBatch(pooled=pooled, tokens=tokens)


def _load_model(device: torch.device) -> torch.nn.Module:
    try:
        from aisfx.models.cnn2d import EmbeddingNet
    except ImportError as e:
        raise EncoderError(f"{NAME} needs its package: {INSTALL_HINT}") from e
    path = weights_path()
    model = EmbeddingNet("max", 3, 1, 64)  # aisfx.inference.load_bestModel's embedding network
    state = {k.removeprefix("embedding_net."): v for k, v in _load_checkpoint(path).items()
             if k.startswith("embedding_net.")}  # the per-dataset classifier heads are not needed
    model.load_state_dict(state, strict=True)
    log.info("loaded %s from %s", NAME, path)
    model.requires_grad_(False)
    return model.to(device).eval()


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    # The file is (state_dict, {dataset: (np.int64 index, classes)}); allow exactly those numpy
    # scalars, so the weights load with weights_only=True (no arbitrary unpickling).
    from numpy._core.multiarray import scalar

    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    with torch.serialization.safe_globals(allowed):
        weights, _datasets = torch.load(path, map_location="cpu", weights_only=True)
    return weights
