"""What one request may ask of `m3jepa serve`: sizes, counts and pixels, each refused with a 4xx beyond."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The request limits of the service (docs/serve.md lists them with their reasons)."""

    # MiniLM reads 256 tokens at most; 1,000 characters is several times a real caption.
    max_query_chars: int = 1_000
    # A JSON search request is a query and two small fields: 16 KiB leaves room for any allowed query.
    max_json_bytes: int = 16 * 1024
    # An uploaded query file (image or sound), multipart framing included.
    max_upload_bytes: int = 10 * 1024 * 1024
    # Refused from the header, before any pixel is decoded (decompression bombs): 5,000 x 5,000.
    max_image_pixels: int = 25_000_000
    # A sound longer than this is refused from its header, before decoding.
    max_audio_seconds: float = 60.0
    max_k: int = 100
    default_k: int = 10

    def as_json(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}
