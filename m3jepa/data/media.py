"""Safe decoding of media files: paths kept inside their root, images checked before use."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from PIL import Image

from m3jepa.data.records import BadItemError, DatasetError

# A decompression bomb is refused before decoding: 64 megapixels is far beyond any dataset image.
MAX_IMAGE_PIXELS = 64_000_000


def safe_join(root: str | Path, relative: str, item: str) -> Path:
    """Join `relative` to `root`, refusing a path that escapes the root (names `item`)."""
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if os.path.isabs(relative) or not candidate.is_relative_to(root_resolved):
        raise DatasetError(f"{item}: path {relative!r} escapes the dataset root {root_resolved}")
    return candidate


def load_image(path: str | Path, item: str | None = None) -> Image.Image:
    """Decode an image fully as RGB, transparent pixels composited on white; BadItemError if unusable."""
    item = item or str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise BadItemError(item, f"image of {w}x{h} pixels exceeds {MAX_IMAGE_PIXELS} (bomb?)")
                im.load()  # forces a full decode, so truncated files fail here, not later
                return _on_white(im)
    except BadItemError:
        raise
    except FileNotFoundError:
        raise BadItemError(item, f"image file {path} is missing") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadItemError(item, f"decompression bomb refused: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadItemError(item, f"image {path} is corrupt or truncated: {e}") from None


def _on_white(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")
