"""`m3jepa stores verify --dataset/--root`: is a store stale against the dataset it was encoded from?"""

from __future__ import annotations

from m3jepa.data.records import membership_fingerprint, row_fingerprint
from m3jepa.store.manifest import load_manifest, resolved_root, rows_from_records
from m3jepa.store.staleness import stale_reason
from m3jepa.store.verify import VerifyReport


def check_source(
    report: VerifyReport, dataset: str | None, root: str | None, seed: int = 0, limit: int | None = None
) -> None:
    """Load the store's split and modality from the dataset (`dataset` or the manifest's; `root` or the
    folder the manifest records) and set `report.stale` when its rows are not the store's any more;
    `report.notes` says when staleness cannot be judged."""
    from m3jepa.data import get_dataset

    m = load_manifest(report.path)
    root = root or m.data_root
    if m.data_root and str(resolved_root(root)) != m.data_root:
        report.stale = f"{report.path} was encoded from {m.data_root}, not {resolved_root(root)}"
        return
    # skip_bad: items the encode dropped have no row; any other difference shows in the membership below
    ds = get_dataset(dataset or m.dataset, root, seed=seed, limit=limit, skip_bad=True)
    records = ds.records(m.split, m.modality)
    if membership_fingerprint(records) != m.membership:
        report.stale = (
            f"{report.path} is stale: the dataset's {m.split}/{m.modality} now has {len(records)} rows "
            f"(the store {m.rows}) or other sample ids; pass the --seed and --limit it was encoded with"
        )
        return
    if m.content is None:
        report.notes.append(
            "the store records no content fingerprint, so edited captions or media are not seen"
        )
        return
    content = [row_fingerprint(r, m.content_hash or "stat") for r in records]
    report.stale = stale_reason(
        report.path, m, rows_from_records(records, content=content), m.content_hash or "stat"
    )
