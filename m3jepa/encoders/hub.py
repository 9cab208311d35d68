"""Local model directories and the Hugging Face cache: revisions, config.json, cached snapshots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from m3jepa.encoders.base import EncoderError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def dir_revision(path: str | Path) -> str:
    """sha256 of config.json plus the names and sizes of the weight files: cheap and stable."""
    path = Path(path)
    h = hashlib.sha256()
    h.update((path / "config.json").read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")):
            h.update(f"\n{f.name}:{f.stat().st_size}".encode())
    return f"sha256:{h.hexdigest()[:16]}"


def cached_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of `repo_id` (one with a config.json), or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def offline_error(repo_id: str) -> EncoderError:
    """The error for a hub id that is not cached locally: no network is reachable from here."""
    return EncoderError(
        f"{repo_id} is not in the local Hugging Face cache and no network is reachable to download it; "
        f"download it on a connected machine (huggingface-cli download {repo_id} --local-dir DIR), "
        f"copy DIR here and pass hf:/path/to/DIR"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a local model directory; EncoderError when missing or unreadable."""
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise EncoderError(f"{model_dir} has no config.json; is it a transformers model directory?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EncoderError(f"{cfg_path} is unreadable: {e}") from e
    if not isinstance(config, dict):
        raise EncoderError(f"{cfg_path} is not a JSON object")
    return config
