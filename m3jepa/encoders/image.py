"""Image preprocessing without torchvision: shortest-side resize, center crop, normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from m3jepa.data.media import load_image
from m3jepa.data.records import Blob

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained with inputs (x - 127) / 128 on 0..255 pixels (TF efficientnet_lite_builder).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side `size`, aspect kept, long side truncated (as torchvision)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, max(size, int(size * long / short))
    return (new_short, new_long) if w <= h else (new_long, new_short)


def resize_shortest(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Scale so the shorter side is `size`, keeping the aspect ratio (long side truncated, as torchvision)."""
    new_w, new_h = resized_size(*img.size, size)
    if (new_w, new_h) == img.size:
        return img
    return img.resize((new_w, new_h), _RESAMPLE[resample])


def crop_offsets(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of the central `size` x `size` window (rounded as torchvision's CenterCrop)."""
    if w < size or h < size:
        raise ValueError(f"center_crop: image {w}x{h} is smaller than the crop {size}")
    return int(round((w - size) / 2.0)), int(round((h - size) / 2.0))


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` window (offsets rounded as torchvision's CenterCrop)."""
    left, top = crop_offsets(*img.size, size)
    return img.crop((left, top, left + size, top + size))


def resize_and_crop(img: Image.Image, size: int, crop: int, resample: str = "bicubic") -> Image.Image:
    """`center_crop(resize_shortest(img, size, resample), crop)` bit for bit, computing little beyond it.

    Pillow resizes in two one-axis passes (the order chosen by `_horizontal_first`), each output pixel of
    a pass from its own coefficients. Each pass is run here on its own; on an axis where a box resize
    reproduces exactly the doubles Pillow computes for the cropped outputs (always the short side when
    `size` is a power of two; see `_exact_box`) only those outputs are made, else the whole axis is made
    and cropped afterwards. Mirrors Pillow 13's Resample.c; tests compare it with the plain path.
    """
    w, h = img.size
    new_w, new_h = resized_size(w, h, size)
    left, top = crop_offsets(new_w, new_h, crop)
    if (new_w, new_h) == (w, h):
        return img.crop((left, top, left + crop, top + crop))
    filt = _RESAMPLE[resample]
    bx = _exact_box(w, new_w, left, crop) if new_w != w else None
    by = _exact_box(h, new_h, top, crop) if new_h != h else None

    def horizontal(im: Image.Image) -> Image.Image:
        if new_w == w:
            return im
        if bx is None:
            return im.resize((new_w, im.height), filt)
        return im.resize((crop, im.height), filt, box=(bx[0], 0, bx[1], im.height))

    def vertical(im: Image.Image) -> Image.Image:
        if new_h == h:
            return im
        if by is None:
            return im.resize((im.width, new_h), filt)
        return im.resize((im.width, crop), filt, box=(0, by[0], im.width, by[1]))

    out = vertical(horizontal(img)) if _horizontal_first(w, h, new_w, new_h) else horizontal(vertical(img))
    x0, y0 = (0 if bx else left), (0 if by else top)
    return out if out.size == (crop, crop) else out.crop((x0, y0, x0 + crop, y0 + crop))


def _horizontal_first(w: int, h: int, new_w: int, new_h: int) -> bool:
    # Pillow's ImagingResampleInner: the vertical pass goes first when the height shrinks by more than
    # twice as many pixels as the width; the passes round to uint8 in between, so the order matters.
    return not (h - new_h > 0 and h - new_h > (w - new_w) * 2)


def _centers(in0: float, in1: float, n: int) -> tuple[float, np.ndarray]:
    # Pillow's precompute_coeffs: box edges are C floats, scale = (double)(in1 - in0) / n,
    # center of output x = in0 + (x + 0.5) * scale (doubles). numpy float32/float64 round the same way.
    lo, hi = np.float32(in0), np.float32(in1)
    scale = float(np.float32(hi - lo)) / n
    return scale, float(lo) + (np.arange(n, dtype=np.float64) + 0.5) * scale


def _exact_box(n_in: int, n_out: int, start: int, crop: int) -> tuple[float, float] | None:
    """Box edges whose resize to `crop` outputs makes outputs start..start+crop of the resize to `n_out`.

    The coefficients of an output depend only on the scale, its center and the input size, so when
    both the scale and every center are the same doubles, the outputs are the same bytes; None when
    they would differ (then the whole axis is resized and cropped).
    """
    scale, centers = _centers(0.0, float(n_in), n_out)
    in0, in1 = start * scale, (start + crop) * scale
    if float(np.float32(in1)) > n_in:  # Pillow refuses a box beyond the image
        return None
    box_scale, box_centers = _centers(in0, in1, crop)
    if box_scale != scale or not np.array_equal(box_centers, centers[start : start + crop]):
        return None
    return float(np.float32(in0)), float(np.float32(in1))


@lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    # (3, 256) float32: (v / 255 - mean) / std for every uint8 value v, with the very float32 operations
    # of the array formula, so looking a pixel up gives the bytes computing it would.
    v = np.arange(256, dtype=np.float32)[:, None] / 255.0  # (256, 1)
    table = (v - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)  # (256, 3)
    table = np.ascontiguousarray(table.T)
    table.flags.writeable = False
    return table


def to_normalized_tensor(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """RGB (or L: three equal channels) image → (3, H, W) float32 with channel-wise (x / 255 - mean) / std.

    A pixel's value depends only on its byte and channel, so each channel is one table look-up.
    """
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    table = _normalize_table(tuple(mean), tuple(std))
    planes = [img] * 3 if img.mode == "L" else img.split()
    out = np.empty((3, img.height, img.width), dtype=np.float32)  # (3, H, W)
    for c, plane in enumerate(planes):
        np.take(table[c], np.asarray(plane), out=out[c])
    return torch.from_numpy(out)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Path or Blob → {"pixel_values": (3, crop, crop)}; plain data, so it pickles into DataLoader workers."""

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

    def __call__(self, payload: str | Blob) -> dict[str, torch.Tensor]:
        """Decode one image file or Blob (BadItemError if unusable) and return its normalised crop."""
        # Grey images stay one channel (L) through the resize: the same bytes as RGB, a third of the work.
        img = load_image(payload, keep_gray=True)  # RGB or L, transparency composited on white
        img = resize_and_crop(img, self.resize, self.crop, self.resample)
        return {"pixel_values": to_normalized_tensor(img, self.mean, self.std)}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Stack items into {"pixel_values": (B, 3, crop, crop)}.

        In a DataLoader worker the stack is made in shared memory (torch's default_collate), so handing
        the batch to the main process copies nothing.
        """
        return {"pixel_values": default_collate([it["pixel_values"] for it in items])}
