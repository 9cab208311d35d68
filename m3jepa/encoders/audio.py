"""Transformers audio towers: CLAP (HTSAT) and LanguageBind-Audio, with picklable preprocessors."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3jepa.data.media import load_audio
from m3jepa.encoders.base import EncodedBatch, Encoder, EncoderError, EncoderSpec
from m3jepa.encoders.hf import check_kind

log = logging.getLogger(__name__)

CLAP_HUB = "laion/clap-htsat-unfused"
CLAP_DIM = 512
CLAP_TYPES = ("clap", "clap_audio_model")  # ClapModel / ClapAudioModelWithProjection directories
LANGUAGEBIND_HUB = "LanguageBind/LanguageBind_Audio_FT"
LANGUAGEBIND_DIM = 768
LANGUAGEBIND_TYPES = ("LanguageBindAudio",)
LANGUAGEBIND_SAMPLE_RATE = 16000
LANGUAGEBIND_HINT = (
    "languagebind-audio needs the LanguageBind code, which is not on PyPI: "
    "`git clone https://github.com/PKU-YuanGroup/LanguageBind && "
    "pip install -r LanguageBind/requirements.txt` "
    "(it needs torchaudio) and `export PYTHONPATH=$PWD/LanguageBind`; then download the weights on a "
    f"connected machine (`huggingface-cli download {LANGUAGEBIND_HUB} --local-dir DIR`) and pass "
    "hf:/path/to/DIR or put them in the local Hugging Face cache"
)


def _raise(error: EncoderError, device: torch.device, dtype: torch.dtype) -> Encoder:
    raise error


def pooled_only(name: str, kind: str) -> None:
    """Refuse kind='tokens' for an encoder whose only latent is its projected clip embedding."""
    check_kind(kind)
    if kind != "pooled":
        raise EncoderError(f"{name} offers kind='pooled' only (one projected embedding per clip)")


# ---------------------------------------------------------------- CLAP


def clap_preset_spec(name: str = "clap-htsat") -> EncoderSpec:
    """`clap-htsat`: laion/clap-htsat-unfused from the local cache; listable (not buildable) when absent."""
    from m3jepa.encoders.hub import cached_snapshot, offline_error

    snapshot = cached_snapshot(CLAP_HUB)
    if snapshot is None:
        revision = f"hf-hub:{CLAP_HUB}@not-cached"
        return _clap_spec(name, CLAP_DIM, revision, functools.partial(_raise, offline_error(CLAP_HUB)))
    return clap_dir_spec(name, snapshot, f"hf-hub:{CLAP_HUB}@{snapshot.name}")


def clap_dir_spec(name: str, model_dir: Path, revision: str) -> EncoderSpec:
    """A local ClapModel or ClapAudioModelWithProjection directory (what `hf:<dir>` routes here)."""
    from m3jepa.encoders.hub import read_config

    config = read_config(model_dir)
    dim = config.get("projection_dim", CLAP_DIM)
    if not isinstance(dim, int):
        raise EncoderError(f"{model_dir}/config.json: projection_dim {dim!r} is not an integer")
    factory = functools.partial(ClapAudioEncoder, name, str(model_dir), revision)
    return _clap_spec(name, dim, revision, factory)


def _clap_spec(name: str, dim: int, revision: str, factory: Any) -> EncoderSpec:
    return EncoderSpec(name=name, modality="audio", dim=dim, pooling="projection+l2norm", revision=revision,
                       layers="htsat-pooler", factory=factory)


class ClapPreprocessor:
    """Path → {"input_features": (C, T, 64)} through transformers' ClapFeatureExtractor (numpy only).

    C = 1 for unfused checkpoints (laion/clap-htsat-unfused), 4 for fused ones.

    Picklable: carries the model directory and loads the feature extractor lazily in each process.
    Clips are cropped to the extractor's max_length_s (10 s) before it sees them, so its random
    crop / random fusion chunks never run and features are deterministic.
    """

    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        self._fe: Any = None
        # a fused HTSAT takes 4 mel channels ("fusion"), an unfused one 1 ("rand_trunc")
        self.truncation = "fusion" if _enable_fusion(Path(model_dir)) else "rand_trunc"

    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "_fe": None, "truncation": self.truncation}

    @property
    def extractor(self) -> Any:
        """The model's ClapFeatureExtractor (its defaults when the directory has no preprocessor config)."""
        if self._fe is None:
            from transformers import ClapFeatureExtractor

            if (Path(self.model_dir) / "preprocessor_config.json").is_file():
                self._fe = ClapFeatureExtractor.from_pretrained(self.model_dir)
            else:
                log.warning("%s has no preprocessor_config.json; using ClapFeatureExtractor defaults",
                            self.model_dir)
                self._fe = ClapFeatureExtractor()
        return self._fe

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """Decode at the extractor's rate (48 kHz), crop to 10 s, log-mel; BadItemError if unusable."""
        fe = self.extractor
        wave = load_audio(payload, sample_rate=fe.sampling_rate, max_seconds=fe.max_length_s)
        wave = wave[: fe.nb_max_samples]  # (N,), N <= max samples: the padding path, never a random crop
        feats = fe(wave, sampling_rate=fe.sampling_rate, truncation=self.truncation,
                   return_tensors="np")["input_features"][0]
        return {"input_features": torch.from_numpy(np.asarray(feats, dtype=np.float32))}  # (C, T, 64)

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """{"input_features": (B, C, T, 64), "is_longer": (B, 1) all False (clips were cropped to 10 s)}."""
        feats = torch.stack([it["input_features"] for it in items])
        # The extractor marks a random clip as "longer" when none is; that is noise we do not want.
        return {"input_features": feats, "is_longer": torch.zeros(len(items), 1, dtype=torch.bool)}


def _enable_fusion(model_dir: Path) -> bool:
    from m3jepa.encoders.hub import read_config

    config = read_config(model_dir)
    audio_config = config.get("audio_config", config)  # ClapModel nests it; the audio-only model does not
    return bool(audio_config.get("enable_fusion", False))


class ClapAudioEncoder:
    """Pooled = audio_projection(HTSAT pooler output), L2-normalised: CLAP's own audio embedding."""

    def __init__(self, name: str, model_dir: str, revision: str, device: torch.device, dtype: torch.dtype):
        self.spec = clap_dir_spec(name, Path(model_dir), revision)
        self.device = device
        self.dtype = dtype
        self.preprocessor = ClapPreprocessor(model_dir)
        self.audio_model, self.projection = _load_clap(Path(model_dir), device, dtype)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """(B, C, T, 64) log-mels → (B, projection_dim) unit vectors."""
        pooled_only(self.spec.name, kind)
        feats = batch["input_features"].to(self.device, self.dtype)
        with torch.no_grad():
            out = self.audio_model(input_features=feats, is_longer=batch["is_longer"].to(self.device))
            emb = self.projection(out.pooler_output).float()  # (B, D)
        return EncodedBatch(pooled=torch.nn.functional.normalize(emb, dim=-1).cpu())


def _load_clap(model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import ClapAudioModelWithProjection, ClapModel

    from m3jepa.encoders.hub import read_config

    kind = read_config(model_dir).get("model_type")
    cls = ClapModel if kind == "clap" else ClapAudioModelWithProjection
    try:
        model = cls.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError) as e:
        raise EncoderError(f"cannot load {cls.__name__} from {model_dir}: {e}") from e
    # keep the audio tower and its projection only (a ClapModel also carries a RoBERTa text tower)
    audio_model, projection = model.audio_model, model.audio_projection
    for part in (audio_model, projection):
        part.requires_grad_(False)
        part.to(device).eval()
    log.info("loaded %s (audio tower) from %s", cls.__name__, model_dir)
    return audio_model, projection


# ---------------------------------------------------------------- LanguageBind-Audio


def languagebind_available() -> bool:
    """Whether the `languagebind` package (the LanguageBind repository's code) is importable."""
    import importlib.util

    return importlib.util.find_spec("languagebind") is not None


def languagebind_preset_spec(name: str = "languagebind-audio") -> EncoderSpec:
    """`languagebind-audio`: listable always; building it needs the package and the cached weights."""
    from m3jepa.encoders.hub import cached_snapshot

    if not languagebind_available():
        error = EncoderError(f"{LANGUAGEBIND_HINT} (the languagebind package is not installed)")
        return _lb_spec(name, f"hf-hub:{LANGUAGEBIND_HUB}@languagebind-not-installed",
                        functools.partial(_raise, error))
    snapshot = cached_snapshot(LANGUAGEBIND_HUB)
    if snapshot is None:
        error = EncoderError(f"{LANGUAGEBIND_HUB} is not in the local Hugging Face cache; "
                             f"{LANGUAGEBIND_HINT}")
        return _lb_spec(name, f"hf-hub:{LANGUAGEBIND_HUB}@not-cached", functools.partial(_raise, error))
    return languagebind_dir_spec(name, snapshot, f"hf-hub:{LANGUAGEBIND_HUB}@{snapshot.name}")


def languagebind_dir_spec(name: str, model_dir: Path, revision: str) -> EncoderSpec:
    """A local LanguageBind-Audio directory (model_type LanguageBindAudio), as `hf:<dir>` routes it."""
    if not languagebind_available():
        raise EncoderError(f"{name}: {LANGUAGEBIND_HINT} (the languagebind package is not installed)")
    factory = functools.partial(LanguageBindAudioEncoder, name, str(model_dir), revision)
    return _lb_spec(name, revision, factory)


def _lb_spec(name: str, revision: str, factory: Any) -> EncoderSpec:
    return EncoderSpec(name=name, modality="audio", dim=LANGUAGEBIND_DIM, pooling="projection+l2norm",
                       revision=revision, layers="vit-pooler", factory=factory)


class LanguageBindPreprocessor:
    """Path → {"pixel_values": fbank chunks} with LanguageBind's own audio transform (needs torchaudio).

    Audio is decoded by `load_audio` at 16 kHz (so the transform's own resampling is a no-op) and
    handed over as (waveform (1, N), 16000), the pair LanguageBind's transform expects.
    """

    def __init__(self, model_dir: str):
        self.model_dir = str(model_dir)
        self._transform: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "_transform": None}

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """One clip's LanguageBind input; BadItemError if the file is unusable."""
        if self._transform is None:
            from languagebind import LanguageBindAudioConfig
            from languagebind.audio.processing_audio import get_audio_transform

            self._transform = get_audio_transform(LanguageBindAudioConfig.from_pretrained(self.model_dir))
        wave = load_audio(payload, sample_rate=LANGUAGEBIND_SAMPLE_RATE)  # (N,)
        return {"pixel_values": self._transform((torch.from_numpy(wave)[None], LANGUAGEBIND_SAMPLE_RATE))}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """{"pixel_values": (B, ...)} stacked."""
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}


class LanguageBindAudioEncoder:
    """Pooled = LanguageBindAudio.get_image_features (its projected audio embedding), L2-normalised."""

    def __init__(self, name: str, model_dir: str, revision: str, device: torch.device, dtype: torch.dtype):
        try:
            from languagebind import LanguageBindAudio
        except ImportError as e:
            raise EncoderError(LANGUAGEBIND_HINT) from e
        self.spec = _lb_spec(name, revision, None)
        self.device, self.dtype = device, dtype
        self.preprocessor = LanguageBindPreprocessor(model_dir)
        self.model = LanguageBindAudio.from_pretrained(model_dir, torch_dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """(B, ...) fbank chunks → (B, 768) unit vectors."""
        pooled_only(self.spec.name, kind)
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, self.dtype)
            emb = self.model.get_image_features(pixel_values=pixels)
        return EncodedBatch(pooled=torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
