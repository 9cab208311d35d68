"""Datasets: deterministic records with ids, groups and seeded splits (stage 1 input)."""

from __future__ import annotations

import difflib
import importlib

from m3jepa.data.records import Dataset, DatasetError

# name → (module, loader); modules are imported only when their dataset is asked for.
_LOADERS = {
    "tuxpaint": ("m3jepa.data.tuxpaint", "load_tuxpaint"),
    "tuxpaint-all": ("m3jepa.data.tuxpaint", "load_tuxpaint_all"),
    "emoji": ("m3jepa.data.emoji", "load_emoji"),
    "emoji-style-google": ("m3jepa.data.emoji", "load_emoji_style_google"),
    "emoji-style-twitter": ("m3jepa.data.emoji", "load_emoji_style_twitter"),
    "emoji-style-openmoji": ("m3jepa.data.emoji", "load_emoji_style_openmoji"),
    "coco": ("m3jepa.data.coco", "load_coco"),
    "flickr30k": ("m3jepa.data.flickr30k", "load_flickr30k"),
    "jsonl": ("m3jepa.data.jsonl", "load_jsonl"),
    "webdataset": ("m3jepa.data.wds", "load_webdataset"),
    "tuxpaint-audio": ("m3jepa.data.audio_datasets", "load_tuxpaint_audio"),
    "tuxpaint-trimodal": ("m3jepa.data.audio_datasets", "load_tuxpaint_trimodal"),
    "asterisk": ("m3jepa.data.asterisk", "load_asterisk"),
    "clotho": ("m3jepa.data.clotho", "load_clotho"),
    "audiocaps": ("m3jepa.data.audiocaps", "load_audiocaps"),
    "fashion-mnist": ("m3jepa.data.fashion_mnist", "load_fashion_mnist"),
    "imagefolder": ("m3jepa.data.imagefolder", "load_imagefolder"),
    "imagenet": ("m3jepa.data.imagefolder", "load_imagenet"),
    "easy-vqa": ("m3jepa.data.easy_vqa", "load_easy_vqa"),
    "vqav2": ("m3jepa.data.vqav2", "load_vqav2"),
    "nlvr2": ("m3jepa.data.nlvr2", "load_nlvr2"),
}

_PAPER_ENCODERS = {"image": "dinov2-large", "text": "llama3-8b"}
_SMALL_ENCODERS = {"image": "efficientnet-lite0", "text": "minilm-l6", "audio": "aisfx"}
# audio-text benchmarks as in the paper: LanguageBind's audio tower, LLaMA-3 8B for text (docs/audio.md)
_PAPER_AUDIO_ENCODERS = {"audio": "languagebind-audio", "text": "llama3-8b"}

# The encoders each dataset is embedded with when the config names none.
DEFAULT_ENCODERS: dict[str, dict[str, str]] = {
    # image and text only: Tux Paint's sounds pair with captions through "tuxpaint-audio" (only the
    # stamps that have a sound), since a 785-caption text store cannot pair with 131 sounds.
    "tuxpaint": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    # the same with the 165 SVG-only stamps rendered (opt-in: the default's splits and numbers stay)
    "tuxpaint-all": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    # emoji: by concept (emoji) or leaving one drawing style out for test (emoji-style-<style>)
    "emoji": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    "emoji-style-google": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    "emoji-style-twitter": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    "emoji-style-openmoji": {"image": "efficientnet-lite0", "text": "minilm-l6"},
    "coco": dict(_PAPER_ENCODERS),
    "flickr30k": dict(_PAPER_ENCODERS),
    "jsonl": dict(_SMALL_ENCODERS),
    "webdataset": {"image": "efficientnet-lite0", "text": "minilm-l6"},  # img2dataset shards
    "tuxpaint-audio": {"audio": "aisfx", "text": "minilm-l6"},
    "tuxpaint-trimodal": {"image": "efficientnet-lite0", "audio": "aisfx", "text": "minilm-l6"},
    "asterisk": {"audio": "aisfx", "text": "minilm-l6"},
    "clotho": dict(_PAPER_AUDIO_ENCODERS),
    "audiocaps": dict(_PAPER_AUDIO_ENCODERS),
    # classification: class labels as a modality (docs/classification.md); grayscale is decoded as RGB
    "fashion-mnist": {"image": "efficientnet-lite0", "label": "onehot"},
    "imagefolder": {"image": "efficientnet-lite0", "label": "onehot"},
    "imagenet": {"image": "dinov2-large", "label": "onehot"},
    # VQA: question and answer stores are text, NLVR2's right image (image2) an image (docs/vqa.md)
    "easy-vqa": {"image": "efficientnet-lite0", "question": "minilm-l6", "answer": "minilm-l6"},
    "vqav2": {"image": "dinov2-large", "question": "llama3-8b", "answer": "llama3-8b"},
    "nlvr2": {"image": "dinov2-large", "image2": "dinov2-large",
              "question": "llama3-8b", "answer": "llama3-8b"},
}


def list_datasets() -> list[str]:
    """The registered dataset names, sorted."""
    return sorted(_LOADERS)


def closest(name: str, choices: list[str]) -> str:
    """" (did you mean 'x'?)" for the choice nearest to a misspelt `name` (difflib), or ""."""
    near = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_dataset_name(name: str) -> None:
    """DatasetError for a name no dataset is registered under: lists the known ones, suggests the closest."""
    if name not in _LOADERS:
        known = list_datasets()
        hint = closest(name, known)
        raise DatasetError(f"unknown dataset {name!r}{hint}; known datasets: {', '.join(known)}")


# Datasets that take settings of their own (encode config keys, passed as `options`).
OPTION_DATASETS = ("webdataset",)


def get_dataset(
    name: str,
    root: str | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    skip_bad: bool = False,
    rerender: bool = False,
    options: dict | None = None,
) -> Dataset:
    """Load dataset `name` from `root` (None: its default); `limit` keeps the first N groups per split.

    `rerender` (`m3jepa encode --force`): datasets that render their SVGs render them again instead of
    reusing the render cache. `options` are a dataset's own settings (webdataset: caption_field,
    split_field, train/val/test_shards); a dataset that takes none refuses them, so a setting never
    silently does nothing.
    """
    check_dataset_name(name)
    module, loader = _LOADERS[name]
    load = getattr(importlib.import_module(module), loader)
    if name in OPTION_DATASETS:
        return load(root, seed=seed, limit=limit, skip_bad=skip_bad, **(options or {}))
    if options:
        keys = ", ".join(f"encode.{k}" for k in sorted(options))
        raise DatasetError(f"{keys} apply to --dataset {' or '.join(OPTION_DATASETS)} only, not {name!r}; "
                           f"unset them")
    if not rerender:
        return load(root, seed=seed, limit=limit, skip_bad=skip_bad)
    from m3jepa.data.svg import rerendering

    with rerendering():
        return load(root, seed=seed, limit=limit, skip_bad=skip_bad)


__all__ = [
    "DEFAULT_ENCODERS", "Dataset", "DatasetError", "check_dataset_name", "closest", "get_dataset",
    "list_datasets",
]
