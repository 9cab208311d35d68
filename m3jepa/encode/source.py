"""`m3jepa stores verify --dataset/--root`: is a store stale against the dataset it was encoded from?"""

from __future__ import annotations

from m3jepa.config import EncodeConfig
from m3jepa.data.records import record_stream
from m3jepa.encode.jobs import StoreJob, scan
from m3jepa.store.manifest import load_manifest, resolved_root
from m3jepa.store.staleness import stale_reason
from m3jepa.store.verify import VerifyReport


def check_source(
    report: VerifyReport, dataset: str | None, root: str | None, seed: int = 0, limit: int | None = None,
    options: dict | None = None,
) -> None:
    """Read the store's split and modality from the dataset (`dataset` or the manifest's; `root` or the
    folder the manifest records; `options` its settings, e.g. a webdataset's caption field) and set
    `report.stale` when its rows are not the store's any more; `report.notes` says when staleness cannot
    be judged. The dataset is read as a stream, one row at a time."""
    from m3jepa.data import get_dataset

    m = load_manifest(report.path)
    root = root or m.data_root
    if m.data_root and str(resolved_root(root)) != m.data_root:
        report.stale = f"{report.path} was encoded from {m.data_root}, not {resolved_root(root)}"
        return
    # skip_bad: items the encode dropped have no row; any other difference shows in the membership below
    ds = get_dataset(dataset or m.dataset, root, seed=seed, limit=limit, skip_bad=True, options=options)
    stream = record_stream(ds, m.split, m.modality)
    content_hash = m.content_hash or "stat"
    cfg = EncodeConfig(dataset=m.dataset, skip_bad=True, content_hash=content_hash)
    found = scan(cfg, m.split, m.modality, stream)
    if found.membership != m.membership:
        report.stale = (
            f"{report.path} is stale: the dataset's {m.split}/{m.modality} now has {found.rows} rows "
            f"(the store {m.rows}) or other sample ids; pass the --seed and --limit it was encoded with"
        )
        return
    if m.content is None:
        report.notes.append(
            "the store records no content fingerprint, so edited captions or media are not seen"
        )
        return
    job = StoreJob(m.split, m.modality, stream, None, report.path, m, refused=found.refused,  # type: ignore[arg-type]
                   content_hash=content_hash, content=found.fingerprints)
    report.stale = stale_reason(report.path, m, found.content, job.rows, content_hash)
