"""Uploaded query files: checked from their header before decoding, held privately only while queried."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from m3jepa.data.media import check_image_size
from m3jepa.data.records import BadItemError
from m3jepa.serve.errors import RequestError
from m3jepa.serve.limits import Limits

# Pillow format -> the suffix the stored copy gets (the encoders open the file by path).
IMAGE_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
AUDIO_FORMATS = {"WAV": ".wav", "FLAC": ".flac", "OGG": ".ogg", "MP3": ".mp3"}


def checked_suffix(modality: str, data: bytes, limits: Limits) -> str:
    """The file suffix of an acceptable upload of `modality`; RequestError (4xx) for anything else."""
    if not data:
        raise RequestError(400, "the uploaded file is empty", "empty_file")
    if modality == "image":
        return _image_suffix(data, limits)
    if modality == "audio":
        return _audio_suffix(data, limits)
    raise RequestError(400, f"{modality} queries are not uploads; send them as JSON to POST /api/search",
                       "no_upload_route")


def _image_suffix(data: bytes, limits: Limits) -> str:
    names = ", ".join(IMAGE_FORMATS)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its own limit and twice it; ours is lower and checked first
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
                w, h = im.size
                if w * h > limits.max_image_pixels:  # from the header: nothing is decoded yet
                    raise RequestError(413, f"the image is {w:,} x {h:,} pixels; the limit is "
                                            f"{limits.max_image_pixels:,} pixels", "image_too_large")
                try:  # an extreme aspect ratio is refused from the header too, not after a full decode
                    check_image_size(w, h, "the uploaded image", limits.max_image_pixels)
                except BadItemError as e:
                    raise RequestError(400, e.reason, "image_aspect") from None
                suffix = IMAGE_FORMATS[im.format]
                im.load()  # a truncated or corrupt file fails here, with our message, not in the encoder
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(413, f"the image header claims more than {limits.max_image_pixels:,} pixels "
                                "(a decompression bomb?); refused before decoding",
                           "image_too_large") from None
    except UnidentifiedImageError:
        raise RequestError(415, f"the uploaded file is not an image of a served format ({names})",
                           "not_an_image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise RequestError(400, f"the image is corrupt or truncated: {e}", "corrupt_file") from None
    return suffix


def _audio_suffix(data: bytes, limits: Limits) -> str:
    import soundfile as sf  # lazily: only audio queries need libsndfile

    names = ", ".join(AUDIO_FORMATS)
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        raise RequestError(415, f"the uploaded file is not a sound of a served format ({names})",
                           "not_a_sound") from None
    if info.format not in AUDIO_FORMATS:
        raise RequestError(415, f"{info.format} sound is not served; send one of {names}", "not_a_sound")
    if info.duration > limits.max_audio_seconds:
        raise RequestError(413, f"the sound lasts {info.duration:.1f} s; the limit is "
                                f"{limits.max_audio_seconds:g} s", "sound_too_long")
    return AUDIO_FORMATS[info.format]


class UploadFolder:
    """A folder only this user can read (mode 0700), holding each upload only while its query runs."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="m3jepa-serve-"))  # mkdtemp creates it with mode 0700

    @contextmanager
    def holding(self, data: bytes, suffix: str) -> Iterator[Path]:
        """A file (mode 0600) holding `data`, removed when the block ends, whatever happens in it."""
        fd, name = tempfile.mkstemp(suffix=suffix, dir=self.path)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            yield path
        finally:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
