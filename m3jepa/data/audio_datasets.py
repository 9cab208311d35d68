"""Audio views of image datasets: `tuxpaint-audio`, the stamps that have a sound, with their captions."""

from __future__ import annotations

import logging

from m3jepa.data.splits import Item, ItemDataset

log = logging.getLogger(__name__)


def load_tuxpaint_audio(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Tux Paint restricted to stamps with a `name.ogg`: one sound and one caption per group.

    Splits are tuxpaint's own (seeded over caption clusters of all stamps), so a stamp is on the same
    side here as in `tuxpaint`. The restriction matters for training: stage 2 pairs every caption with
    a clip of its group, and `tuxpaint`'s text store also holds the ~650 stamps without a sound.
    """
    from m3jepa.data.tuxpaint import load_tuxpaint

    full = load_tuxpaint(root, seed=seed, skip_bad=skip_bad)
    items = []
    for split in full.splits():
        audio = full.records(split, "audio")
        with_sound = {r.group_id for r in audio}
        text = [r for r in full.records(split, "text") if r.group_id in with_sound]
        items += [Item(split, r.group_id, r.sample_id, r.modality, r.payload) for r in audio + text]
    log.info("tuxpaint-audio: %d stamps with a sound", sum(1 for it in items if it.modality == "audio"))
    return ItemDataset("tuxpaint-audio", items, limit=limit, skipped=full.skipped)


def load_tuxpaint_trimodal(
    root: str | None = None, *, seed: int = 0, limit: int | None = None, skip_bad: bool = False
) -> ItemDataset:
    """Tux Paint restricted to stamps with an image, a caption and a sound: one of each per group.

    The three-modality predictor trains all six directions between them, so every group must have
    all three (an SVG-only stamp has no image here). Splits are tuxpaint's own.
    """
    from m3jepa.data.tuxpaint import load_tuxpaint

    full = load_tuxpaint(root, seed=seed, skip_bad=skip_bad)
    items = []
    for split in full.splits():
        by_modality = {m: full.records(split, m) for m in ("image", "text", "audio")}
        complete = set.intersection(*({r.group_id for r in rs} for rs in by_modality.values()))
        for records in by_modality.values():
            items += [
                Item(split, r.group_id, r.sample_id, r.modality, r.payload)
                for r in records
                if r.group_id in complete
            ]
    log.info(
        "tuxpaint-trimodal: %d stamps with an image, a caption and a sound",
        sum(1 for it in items if it.modality == "audio"),
    )
    return ItemDataset("tuxpaint-trimodal", items, limit=limit, skipped=full.skipped)
