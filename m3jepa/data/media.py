"""Safe decoding of media files: paths kept inside their root, images and sounds checked before use."""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from m3jepa.data.records import BadItemError, Blob, DatasetError

log = logging.getLogger(__name__)

# A decompression bomb is refused before decoding: 64 megapixels is far beyond any dataset image.
MAX_IMAGE_PIXELS = 64_000_000
# An image whose long side is more than this many times its short side is refused from its header, before
# decoding. Every encoder scales the short side to 256 pixels, so the long side's work grows with the
# ratio: a 48 KB PNG of 1 x 25,000,000 pixels asked the resize for 6.4 billion columns (a 47.7 GiB index
# array). At 500:1 a resize makes at most 256 x 128,000 = 32.8 megapixels, half the decoding budget
# above (a 110 x 55,000 image: 1.3 s and 304 MB peak on 2 loaded cores), and thin strips such as a
# 256 x 2 gradient are read. 360-degree panoramas are 2:1 to about 10:1.
MAX_ASPECT_RATIO = 500

SVG_SUFFIXES = (".svg", ".svgz")
SVG_HINT = ("m3jepa reads SVG only in the datasets that render it (tuxpaint-all, emoji); render it to PNG "
            "first, e.g. rsvg-convert --width 512 --height 512 --keep-aspect-ratio -o out.png in.svg")


def safe_join(root: str | Path, relative: str, item: str) -> Path:
    """Join `relative` to `root`, refusing a path that escapes the root (names `item`)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if os.path.isabs(relative) or not candidate.is_relative_to(root_resolved):
        raise DatasetError(f"{item}: path {relative!r} escapes the dataset root {root_resolved}")
    return candidate


def check_image_size(width: int, height: int, item: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """BadItemError naming `item` for a size read from a header that is too large to decode or to resize:
    over `max_pixels`, or longer than MAX_ASPECT_RATIO times its short side. Costs nothing: call it
    before decoding (load_image does; so can any reader that opens images itself)."""
    if width * height > max_pixels:
        raise BadItemError(item, f"image of {width:,} x {height:,} pixels exceeds {max_pixels:,} pixels "
                                 "(a decompression bomb?); refused before decoding")
    short, long = sorted((width, height))
    if long > MAX_ASPECT_RATIO * short:
        ratio = long / max(short, 1)
        raise BadItemError(item, f"image of {width:,} x {height:,} pixels: its long side is {ratio:,.0f} "
                                 f"times its short side; m3jepa reads images up to {MAX_ASPECT_RATIO}:1 "
                                 "(crop it into squarer pieces or pad it); refused before decoding")


def looks_like_svg(path: str | Path | Blob) -> bool:
    """Whether a file (or a Blob) is an SVG drawing (by its name, or `<svg` in its first kilobyte)."""
    if str(path).lower().endswith(SVG_SUFFIXES):
        return True
    if isinstance(path, Blob):
        head = path.data[:1024]
        return b"<svg" in head and head.lstrip()[:1] == b"<"
    try:
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return False
    return b"<svg" in head and head.lstrip()[:1] == b"<"


def load_image(path: str | Path | Blob, item: str | None = None, *, keep_gray: bool = False) -> Image.Image:
    """Decode an image file (or a Blob of its bytes) fully as a person sees it, as RGB; BadItemError if
    unusable.

    The header's size is checked first (`check_image_size`). The EXIF orientation is applied,
    transparent pixels are composited on white, and 16- or 32-bit grey is scaled to 8 bits (`to_8bit`).
    With `keep_gray`, a grey image comes back as L: its RGB would be three copies of it.
    """
    item = item or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(_source(path)) as im:
                check_image_size(*im.size, item)
                im.load()  # forces a full decode, so truncated files fail here, not later
                return _on_white(to_8bit(upright(im), item), keep_gray)
    except BadItemError:
        raise
    except FileNotFoundError:
        raise BadItemError(item, f"image file {path} is missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadItemError(item, f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UnidentifiedImageError) and looks_like_svg(path):
            raise BadItemError(item, f"{path} is an SVG drawing, not a raster image; {SVG_HINT}") from None
        raise BadItemError(item, f"image {path} is corrupt or truncated: {e}") from None


def _source(path: str | Path | Blob) -> str | Path | io.BytesIO:
    return io.BytesIO(path.data) if isinstance(path, Blob) else path


# EXIF tag 0x0112: how the camera held the sensor; 1 (or no tag) means the pixels are already upright.
EXIF_ORIENTATION = 0x0112


def upright(im: Image.Image) -> Image.Image:
    """`im` rotated / mirrored as its EXIF orientation tag says (a phone photo stored sideways)."""
    if im.getexif().get(EXIF_ORIENTATION, 1) in (1, None):
        return im  # the common case: no copy, so untagged images decode to the very same bytes
    return ImageOps.exif_transpose(im)


WIDE_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey, e.g. a 16-bit PNG or TIFF


def to_8bit(im: Image.Image, item: str = "image") -> Image.Image:
    """16- and 32-bit grey (modes I;16*, I, F) as 8-bit grey (L) by their real range; others unchanged.

    Pillow's own conversion clips at 255, so any 16-bit pixel above 255 turned white. The rule:
    - I;16*: v / 257, rounded: the format's own scale (0 black, 65535 white), as a viewer shows it.
    - F whose values all lie in [0, 1]: v * 255, rounded (the usual scale of float images).
    - I or F whose values all lie in 0..255: rounded, unchanged (8-bit data in a wide container).
    - any other I or F: the image's own range stretched, (v - min) * 255 / (max - min), rounded: a 32-bit
      image has no white point of its own (depth maps, raw sensor counts). A flat one is clipped to 0..255.
    Rounding is to the nearest integer (numpy's rint: halves to even).
    NaN or infinite pixels are a BadItemError naming `item`.
    """
    if im.mode in WIDE_GREY_16:
        v = np.asarray(im).astype(np.uint32)  # (H, W)
        return Image.fromarray(((v + 128) // 257).astype(np.uint8), "L")  # == round(v / 257); no ties
    if im.mode not in ("I", "F"):
        return im
    v = np.asarray(im).astype(np.float64)  # (H, W)
    if not np.isfinite(v).all():
        raise BadItemError(item, f"{im.mode} image holds NaN or infinite pixels; save it with finite values")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if im.mode == "F" and lo >= 0.0 and hi <= 1.0:
        v = v * 255.0
    elif lo < 0.0 or hi > 255.0:
        v = (v - lo) * (255.0 / (hi - lo)) if hi > lo else np.clip(v, 0.0, 255.0)
    return Image.fromarray(np.rint(v).astype(np.uint8), "L")


def _on_white(im: Image.Image, keep_gray: bool = False) -> Image.Image:
    """`im` as RGB (or L, see load_image), transparent pixels composited on an opaque white background.

    Same bytes as `Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")`, cheaper: on opaque
    white a composited channel is a function of (value, alpha) alone, and `paste` with the alpha as mask
    gives that function's values for all 256 x 256 pairs (tests check every pair); fully opaque images
    skip the blend, and grey ones are blended on one channel instead of three.
    """
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":  # (an opaque pixel blends to itself; testing for opacity first costs more)
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(im, mask=im)  # RGB values of im blended by its alpha band
        return out
    if im.mode == "LA":
        grey, alpha = im.getchannel("L"), im.getchannel("A")
        if alpha.getextrema()[0] < 255:
            source, grey = grey, Image.new("L", im.size, 255)
            grey.paste(source, mask=alpha)
        return grey if keep_gray else grey.convert("RGB")
    if im.mode == "L" and keep_gray:
        return im
    return im.convert("RGB")


# A clip whose RMS is below this (about -90 dBFS) carries no usable sound: refused as silent.
SILENCE_RMS = 3e-5


def load_audio(
    path: str | Path | Blob,
    item: str | None = None,
    *,
    sample_rate: int,
    mono: bool = True,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode a sound file as float32 at `sample_rate`: (samples,) if mono, else (channels, samples).

    Channels are averaged for mono; `max_seconds` keeps the first seconds only (cropped before
    resampling, so a long file is never decoded whole). Missing, unreadable, empty, non-finite or
    silent audio is a BadItemError naming `item`.
    """
    item = item or str(path)
    if not isinstance(path, Blob) and not os.path.isfile(path):
        raise BadItemError(item, f"audio file {path} is missing")
    import soundfile as sf  # lazily: only audio encoders need libsndfile

    try:
        with sf.SoundFile(_source(path) if isinstance(path, Blob) else str(path)) as f:
            source_rate = f.samplerate
            frames = -1 if max_seconds is None else int(np.ceil(max_seconds * source_rate))
            wave = f.read(frames=frames, dtype="float32", always_2d=True)  # (samples, channels)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise BadItemError(item, f"audio {path} is corrupt or unreadable: {e}") from None
    if wave.shape[0] == 0:
        raise BadItemError(item, f"audio {path} is empty (0 samples)")
    if not np.isfinite(wave).all():
        raise BadItemError(item, f"audio {path} holds NaN or infinite samples")
    wave = wave.T  # (channels, samples)
    if mono:
        wave = wave.mean(axis=0, keepdims=True)  # (1, samples): the mix-down used by essentia and librosa
    if source_rate != sample_rate:
        log.debug("%s: resampling %d Hz -> %d Hz", item, source_rate, sample_rate)
        wave = resample(wave, source_rate, sample_rate)
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    if rms < SILENCE_RMS:
        raise BadItemError(item, f"audio {path} is silent (RMS {rms:.2g} < {SILENCE_RMS:g})")
    return np.ascontiguousarray(wave[0] if mono else wave, dtype=np.float32)


def resample(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Band-limited polyphase resampling along the last axis (scipy's resample_poly, Kaiser window)."""
    from scipy.signal import resample_poly

    g = math.gcd(int(source_rate), int(target_rate))
    return resample_poly(wave, target_rate // g, source_rate // g, axis=-1).astype(np.float32)
