"""m3jepa: M3-JEPA multimodal alignment on cached encoder features."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `m3jepa.load` without importing torch at `import m3jepa` (the store package imports __version__)
    if name in ("load", "M3Model"):
        from m3jepa import api

        return getattr(api, name)
    raise AttributeError(f"module 'm3jepa' has no attribute {name!r}")
