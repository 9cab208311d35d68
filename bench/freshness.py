"""What stage 2/3's staleness check (m3jepa/core/freshness.py) costs, on the Tux Paint stamps.

    python -m bench.freshness --rounds 5
    python -m bench.freshness --rounds 5 --content-hash sha256

Writes stores of every split of Tux Paint (image and text), with the per-row content fingerprints
`m3jepa encode` records and tiny random features (the check never reads features), into a temporary folder.
Then, alternating in each round: `check_fresh` over every split and both modalities as `train-predictor`
(train, val) plus `evaluate` (test) call it, and its two parts alone: the dataset's listing (get_dataset +
records) and the row fingerprints (a `stat` per image, or its sha256, and a sha256 per caption). Prints
medians and ranges, and the cost per 1,000 rows checked.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import _common as C
from m3jepa.config import load_pipeline
from m3jepa.core.freshness import check_fresh
from m3jepa.data import get_dataset
from m3jepa.data.records import content_digest, membership_fingerprint, row_fingerprint
from m3jepa.store import Manifest, StoreWriter, rows_from_records, store_path

ENCODERS = {"image": "bench-image", "text": "bench-text"}
SPLITS = ("train", "val", "test")


def write_stores(root: Path, content_hash: str) -> int:
    """Tux Paint's stores (dim 4, random) with content fingerprints; returns the rows written."""
    ds = get_dataset("tuxpaint")
    rows = 0
    for split in SPLITS:
        for modality in ("image", "text"):
            records = ds.records(split, modality)
            content = [row_fingerprint(r, content_hash) for r in records]
            manifest = Manifest(dataset="tuxpaint", split=split, modality=modality,
                                membership=membership_fingerprint(records), rows=len(records),
                                encoder=ENCODERS[modality], encoder_revision="r1", pooling="none",
                                layers="none", dim=4, dtype="float32", format="zarr", shard_size=4096,
                                content=content_digest(content), content_hash=content_hash)
            feats = np.random.default_rng(0).standard_normal((len(records), 4)).astype(np.float32)
            path = store_path(root, "tuxpaint", split, modality, ENCODERS[modality])
            with StoreWriter(path, manifest) as w:
                for index, start, end in w.planned_shards():
                    w.write_shard(index, feats[start:end])
                w.finalize(rows_from_records(records, content=content), [])
            rows += len(records)
    return rows


def main() -> None:
    p = C.parser(__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--content-hash", default="stat", choices=("stat", "sha256"))
    args = p.parse_args()
    C.setup(args)
    info = C.header(f"staleness check of stages 2 and 3 on Tux Paint (content_hash={args.content_hash})")
    work = Path(tempfile.mkdtemp(prefix="m3jepa-fresh-"))
    try:
        rows = write_stores(work, args.content_hash)
        cfg = load_pipeline(None, [f'encode.store_root="{work}"', 'encode.dataset="tuxpaint"',
                                   f'encode.image_encoder="{ENCODERS["image"]}"',
                                   f'encode.text_encoder="{ENCODERS["text"]}"'])
        times: dict[str, C.Spread] = {k: C.Spread() for k in ("check_fresh", "listing", "fingerprints")}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            check_fresh(cfg, ["train", "val"], ["image", "text"], "train-predictor")
            check_fresh(cfg, ["test"], ["image", "text"], "evaluate")
            t1 = time.perf_counter()
            ds = get_dataset("tuxpaint", skip_bad=True)
            records = [r for s in SPLITS for m in ("image", "text") for r in ds.records(s, m)]
            t2 = time.perf_counter()
            for r in records:
                row_fingerprint(r, args.content_hash)
            t3 = time.perf_counter()
            times["check_fresh"].values.append(t1 - t0)
            times["listing"].values.append(t2 - t1)
            times["fingerprints"].values.append(t3 - t2)
        result = {**info, "rows": rows, "rounds": args.rounds, "content_hash": args.content_hash}
        print(f"  {rows:,} rows (every split, image and text)")
        for name, spread in times.items():
            per_k = spread.median / rows * 1e3 * 1e3
            print(f"  {name:<13} median {spread.median * 1e3:8.1f} ms ({spread} s) = {per_k:6.2f} ms per "
                  "1K rows")
            result[name] = {"median_s": spread.median, "values_s": spread.values, "ms_per_1k_rows": per_k}
        C.write_json(args.json, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
