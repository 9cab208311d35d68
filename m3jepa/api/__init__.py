"""Use what was trained: `m3jepa.load(run_or_export)` → `M3Model` (embed, classify, answer); `export_run`."""

from m3jepa.api.model import M3Model, ModelSource, load
from m3jepa.api.raw import ApiError

__all__ = ["ApiError", "M3Model", "ModelSource", "load"]
