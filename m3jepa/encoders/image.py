"""Image preprocessing without torchvision: shortest-side resize, center crop, normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from m3jepa.data.media import load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained with inputs (x - 127) / 128 on 0..255 pixels (TF efficientnet_lite_builder).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resize_shortest(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (long side truncated, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, max(size, int(size * long / short))
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _RESAMPLE[resample])


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` window (offsets rounded as torchvision's CenterCrop)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}")
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB image → (3, H, W) float32 with channel-wise (x / 255 - mean) / std."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Path → {"pixel_values": (3, crop, crop)}; plain data, so it pickles into DataLoader workers."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resample: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample={self.resample!r} is not one of {', '.join(_RESAMPLE)}")
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} exceeds resize={self.resize}")

    def __call__(self, payload: str) -> dict[str, torch.Tensor]:
        """Decode one image file (BadItemError if unusable) and return its normalised crop."""
        img = load_image(payload)  # RGB, transparency composited on white
        img = center_crop(resize_shortest(img, self.resize, self.resample), self.crop)
        return {"pixel_values": to_normalized_tensor(img, self.mean, self.std)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Stack items into {"pixel_values": (B, 3, crop, crop)}."""
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}
