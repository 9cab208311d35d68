"""`m3jepa stores import`: embeddings computed elsewhere become normal m3jepa stores, written by StoreWriter.

The rules (docs/feature-store.md, "Importing embeddings"):
- one image store and one text store per split, under `<store_root>/<dataset>/<split>/<modality>/<encoder>/`,
  exactly as `m3jepa encode` lays them out, in a folder or at an fsspec URL (s3://bucket/prefix: StoreWriter's
  commit, shards first and the manifest last, and its lease object); rows keep the source's order (shard N,
  then row); the source itself is a local folder (its .npy files are memory-mapped);
- sample id and group id of both rows of a sample: its key (`--key-column`, default `key`, else
  `image_path`), so an image and its caption row are one group; text rows carry the caption column;
- split: `--split-column` (train/val/test), or `--split NAME` for every row, else `hash_split(key, seed)`,
  the seeded hash the webdataset dataset uses (80/10/10; a key keeps its split when shards are added);
- identity: encoder = the name given (`--image-encoder`, `--text-encoder`), encoder_revision =
  "import:" + 16 hex of sha256 over the source files' fingerprints and the import's options, pooling and
  layers "imported", dim and dtype from the data; data_root = the source folder. A rerun with the same
  files and options finds the stores complete (cached) or resumes them; other files or options are refused
  (`--force` re-imports), and a run trained on the old import refuses the new one (core/runstores.py);
- no dataset can be re-read, so `content` is not recorded: train-predictor and evaluate skip their
  caption/media freshness check; the source fingerprint above is an imported store's freshness;
- a NaN/inf row is an error naming file and row, or with `--skip-bad` an invalid row (zeros, listed in the
  manifest's `skipped`, in both modalities' stores), as encode's skipped rows are.
Memory: the .npy files are memory-mapped and copied CHUNK rows at a time; one store shard per split and
modality is held while it fills; keys pass through as 64-bit hashes and one split code (a byte) per row.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from m3jepa.data.records import LineDigest
from m3jepa.data.splits import SPLITS
from m3jepa.data.wds import hash_split
from m3jepa.encode import import_source as src
from m3jepa.encode.import_source import SourceError, SourceShard
from m3jepa.location import Location, location, remove_tree
from m3jepa.progress import progress
from m3jepa.store.manifest import (
    MANIFEST,
    WRITING,
    Manifest,
    RowMeta,
    StoreError,
    load_manifest,
    mismatches,
    store_path,
)
from m3jepa.store.skiplist import read_skip_lists, write_skip_list
from m3jepa.store.writer import StoreWriter, is_complete

log = logging.getLogger(__name__)

CHUNK = 16384  # source rows copied at once: 16384 x 1280 float32 = 80 MB at most
MODALITIES = ("image", "text")


@dataclass
class ImportOptions:
    """What to import and how (the command's options)."""

    source: Path
    dataset: str
    encoders: dict[str, str]  # modality -> the name of the model that made its embeddings
    store_root: str | Location = Path("stores")  # a folder or an fsspec URL (s3://bucket/prefix)
    globs: dict[str, str | None] = field(default_factory=lambda: dict(src.CLIP_RETRIEVAL))
    key_column: str | None = None
    caption_column: str | None = None  # None: "caption" when the metadata has it
    split_column: str | None = None
    split: str | None = None  # every row to this split
    seed: int = 0
    dtype: str = "float16"
    format: str = "zarr"
    shard_size: int = 2048
    skip_bad: bool = False
    force: bool = False
    allow_gaps: bool = False
    content_hash: str = "stat"


@dataclass
class Scan:
    """Pass 1 over the metadata: each row's split code, and per split its rows and membership digest."""

    shards: list[SourceShard]
    key: str
    caption: str | None
    codes: list[np.ndarray]  # per source shard, (rows,) uint8 index into SPLITS
    counts: dict[str, int]
    membership: dict[str, str]


@dataclass
class ImportResult:
    """The stores an import wrote or found, and how many rows each split got."""

    stores: dict[tuple[str, str], Location]
    cached: list[Location]
    counts: dict[str, int]
    skipped: int

    def table(self) -> str:
        lines = [f"{'split':<6} {'modality':<8} {'rows':>9}  store"]
        for (split, modality), path in sorted(self.stores.items()):
            state = " (cached)" if path in self.cached else ""
            lines.append(f"{split:<6} {modality:<8} {self.counts[split]:>9}  {path}{state}")
        if self.skipped:
            lines.append(f"{self.skipped} rows with NaN or inf were imported as invalid (--skip-bad)")
        return "\n".join(lines)

    def next_command(self, store_root: str | Location) -> str:
        """The train-predictor command that trains on these stores, to print after an import."""
        (_, _), first = next(iter(sorted(self.stores.items())))
        m = load_manifest(first)
        encoders = {mod: load_manifest(p).encoder for (_, mod), p in self.stores.items()}
        sets = " ".join(f"--set encode.{mod}_encoder={enc}" for mod, enc in sorted(encoders.items()))
        return f"next: m3jepa train-predictor --dataset {m.dataset} --store-root {store_root} {sets}"


def run_import(opts: ImportOptions) -> ImportResult:
    """Check the whole source, then write (or resume, or find cached) one store per split and modality."""
    _check_options(opts)
    root = opts.source.expanduser().resolve()
    shards = src.find_shards(root, opts.globs, opts.allow_gaps)
    modalities = [m for m in MODALITIES if m in shards[0].arrays]
    missing = [m for m in modalities if m not in opts.encoders]
    if missing:
        raise SourceError(f"name the model that made the {missing[0]} embeddings: --{missing[0]}-encoder "
                          "NAME (e.g. clip-vit-b-32); it names the stores train-predictor reads")
    scan = _scan(shards, opts)
    revision = "import:" + hashlib.sha256(
        "\n".join([*src.fingerprint(shards, root, opts.content_hash), *_option_lines(opts, scan)]).encode()
    ).hexdigest()[:16]
    manifests = {(s, m): _manifest(opts, scan, shards, root, revision, s, m)
                 for s in SPLITS if scan.counts[s] for m in modalities}
    store_root = location(opts.store_root)
    paths = {k: store_path(store_root, opts.dataset, k[0], k[1], opts.encoders[k[1]]) for k in manifests}
    cached = [paths[k] for k in manifests if _prepare(paths[k], manifests[k], opts.force)]
    todo = {k: m for k, m in manifests.items() if paths[k] not in cached}
    skipped = 0
    if todo:
        skipped = _write(opts, scan, {k: (paths[k], m) for k, m in todo.items()})
    else:
        log.info("every store of this import is complete (cached); --force re-imports")
    return ImportResult(paths, cached, scan.counts, skipped)


def _check_options(opts: ImportOptions) -> None:
    from m3jepa.data import list_datasets

    if opts.dataset in list_datasets():
        raise SourceError(f"--dataset {opts.dataset!r} is a dataset m3jepa encodes itself; name the import "
                          f"otherwise (e.g. {opts.dataset}-imported) so its stores are never taken for an "
                          "encoding of it")
    if opts.split_column and opts.split:
        raise SourceError("--split-column and --split both set the split: give one")
    if opts.split is not None and opts.split not in SPLITS:
        raise SourceError(f"--split {opts.split!r} is not one of {', '.join(SPLITS)}")
    if opts.shard_size <= 0:
        raise SourceError(f"--shard-size {opts.shard_size} must be at least 1")


def _option_lines(opts: ImportOptions, scan: Scan) -> list[str]:
    """The options that decide the stores' rows, part of the import's fingerprint."""
    split = (f"column:{opts.split_column}" if opts.split_column else f"all:{opts.split}" if opts.split
             else f"hash:{opts.seed}")
    return [f"key\t{scan.key}", f"caption\t{scan.caption}", f"split\t{split}", f"skip_bad\t{opts.skip_bad}"]


def _scan(shards: list[SourceShard], opts: ImportOptions) -> Scan:
    """Read the key (and split) column of every metadata file: splits, counts, membership, repeated keys."""
    first = shards[0].metadata
    key = src.key_column(first, opts.key_column)
    caption = opts.caption_column
    if caption is None and "caption" in src.columns(first):
        caption = "caption"
    for s in shards:  # every file, not only the first: a later export may lack a column
        src.key_column(s.metadata, key)
        src.check_column(s.metadata, caption, "--caption-column")
        src.check_column(s.metadata, opts.split_column, "--split-column")
    digests = {s: LineDigest() for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    codes, hashes = [], np.empty(sum(s.rows for s in shards), dtype=np.uint64)
    with progress(len(hashes), desc="import: reading keys", unit="rows") as bar:
        for s in shards:
            codes.append(_scan_shard(s, key, opts, digests, counts, hashes, bar))
    _check_unique(hashes, shards, key)
    return Scan(shards, key, caption, codes, counts, {s: d.hexdigest() for s, d in digests.items()})


def _scan_shard(s: SourceShard, key: str, opts: ImportOptions, digests: dict[str, LineDigest],
                counts: dict[str, int], hashes: np.ndarray, bar: object) -> np.ndarray:
    """One metadata file's split codes (uint8 index into SPLITS); its keys' hashes go to `hashes`."""
    code = np.empty(s.rows, dtype=np.uint8)
    column = opts.split_column
    row, n = 0, sum(counts.values())
    for batch in src.read_columns(s.metadata, [key] + ([column] if column else [])):
        for i, value in enumerate(batch[key]):
            if value is None or str(value) == "":
                raise SourceError(f"{s.metadata} row {row + i}: column {key!r} is empty; every sample needs "
                                  "a key (pass --key-column naming a column that has one)")
            k = str(value)
            if column:
                split = src.split_of(s.metadata, row + i, batch[column][i], column)
            else:
                split = opts.split or hash_split(k, opts.seed)
            code[row + i] = SPLITS.index(split)
            digests[split].add(k)
            counts[split] += 1
            hashes[n] = src.key_hash(k)
            n += 1
        row += len(batch[key])
        bar.update(len(batch[key]))  # type: ignore[attr-defined]
    return code


def _check_unique(hashes: np.ndarray, shards: list[SourceShard], key: str) -> None:
    values, counts = np.unique(hashes, return_counts=True)
    if np.all(counts == 1):
        return
    twice = set(values[counts > 1].tolist())
    seen: dict[int, str] = {}
    for s in shards:  # only on this error path: find the first repeated key by name
        for k in src.keys_of(s.metadata, key):
            h = src.key_hash(k)
            if h in twice:
                if h in seen:
                    raise SourceError(f"key {k!r} (column {key!r}) is used by two rows ({seen[h]} and "
                                      f"{s.metadata}): keys name samples and must be unique; drop the "
                                      "repeat, or pass --key-column with a unique column")
                seen[h] = str(s.metadata)
    raise SourceError(f"two keys of column {key!r} share a 64-bit hash; pass --key-column with another "
                      "column")


def _manifest(opts: ImportOptions, scan: Scan, shards: list[SourceShard], root: Path, revision: str,
              split: str, modality: str) -> Manifest:
    return Manifest(
        dataset=opts.dataset, split=split, modality=modality, membership=scan.membership[split],
        rows=scan.counts[split], encoder=opts.encoders[modality], encoder_revision=revision,
        pooling="imported", layers="imported", dim=shards[0].arrays[modality].dim, dtype=opts.dtype,
        kind="pooled", format=opts.format, shard_size=opts.shard_size, data_root=str(root),
    )


def _prepare(path: Location, manifest: Manifest, force: bool) -> bool:
    """True when the store is complete already (cached); clears it for --force; refuses another import.

    A started store has its manifest (locally, complete or not) or, at a URL, its start record writing.json
    until the complete manifest is written (the commit)."""
    started = next((n for n in (MANIFEST, WRITING) if (path / n).is_file()), None)
    if started is None:
        return False
    if force:
        log.info("--force: removing %s to import it again", path)
        remove_tree(path)
        return False
    if is_complete(path, manifest):
        log.info("%s is complete (cached)", path)
        return True
    found = load_manifest(path, started)
    diffs = mismatches(manifest, found)
    if not diffs:
        return False  # an interrupted import of the same source: StoreWriter resumes it
    rows_or_source = {"encoder_revision", "membership", "rows"}
    if str(found.encoder_revision).startswith("import:") and {d[0] for d in diffs} <= rows_or_source:
        why = "its source files (or the import's options) changed since it was imported"
    else:
        why = "it holds other rows or another encoding (" + "; ".join(
            f"{k}: {str(f)[:24]!r} there, {str(a)[:24]!r} now" for k, a, f in diffs[:3]) + ")"
    raise StoreError(f"{path} exists and {why}; pass --force to import it again (runs trained on it will "
                     "refuse the new store), or choose another --dataset or --store-root")


def _write(opts: ImportOptions, scan: Scan, todo: dict[tuple[str, str], tuple[Location, Manifest]]) -> int:
    """Pass 2: copy each source shard's rows chunk by chunk into the stores' shards; then finalize."""
    writers = {k: StoreWriter(p, m) for k, (p, m) in todo.items()}
    opened = []
    try:
        for w in writers.values():
            opened.append(w.open())
        fills = {k: _Fill(w, w.done_shards(), w.planned_shards()) for k, w in writers.items()}
        row_ids = dict.fromkeys(SPLITS, 0)
        skipped = 0
        with progress(sum(s.rows for s in scan.shards), desc="import: writing", unit="rows") as bar:
            for shard, code in zip(scan.shards, scan.codes, strict=True):
                for start in range(0, shard.rows, CHUNK):
                    end = min(start + CHUNK, shard.rows)
                    skipped += _copy_chunk(opts, scan, shard, code[start:end], start, row_ids, fills)
                    for i, split in enumerate(SPLITS):
                        row_ids[split] += int(np.count_nonzero(code[start:end] == i))
                    bar.update(end - start)
        for k, fill in fills.items():
            fill.flush(final=True)
            skips = read_skip_lists(fill.writer.path, len(fill.plan))
            fill.writer.finalize(_rows(scan, k[0], k[1], {int(s["row_id"]) for s in skips}), skips)
        return skipped
    finally:
        for w in opened:
            w.close()


class _Fill:
    """One store being filled: rows wait in order until a planned shard is full, then it is committed
    (its skip list first, as encode does); a shard committed by an interrupted import is not rewritten."""

    def __init__(self, writer: StoreWriter, done: set[int], plan: list[tuple[int, int, int]]):
        self.writer, self.done, self.plan = writer, done, plan
        self.parts: list[np.ndarray] = []
        self.skipped: list[dict] = []
        self.rows = 0
        self.next = 0

    def add(self, rows: np.ndarray, skipped: list[dict]) -> None:
        self.parts.append(rows.astype(self.writer.manifest.dtype))
        self.skipped += skipped
        self.rows += len(rows)
        self.flush()

    def flush(self, final: bool = False) -> None:
        while self.next < len(self.plan):
            index, start, end = self.plan[self.next]
            if self.rows < end - start and not final:
                return
            data = np.concatenate(self.parts) if len(self.parts) != 1 else self.parts[0]
            rows, rest = data[: end - start], data[end - start:]
            mine = [s for s in self.skipped if s["row_id"] < end]
            self.skipped = [s for s in self.skipped if s["row_id"] >= end]
            self.parts, self.rows = ([rest] if len(rest) else []), len(rest)
            if index not in self.done:
                write_skip_list(self.writer.path, index, mine)
                self.writer.write_shard(index, rows)
            self.next += 1


def _copy_chunk(opts: ImportOptions, scan: Scan, shard: SourceShard, code: np.ndarray, start: int,
                row_ids: dict[str, int], fills: dict[tuple[str, str], _Fill]) -> int:
    """Append the source shard's rows [start, start + len(code)) to their stores; the count of NaN rows."""
    end = start + len(code)
    chunks, bad = {}, np.zeros(len(code), dtype=bool)
    for modality, info in shard.arrays.items():
        chunk = np.array(src.open_npy(info)[start:end])  # (n, D) source dtype: a copy, read once
        finite = np.isfinite(chunk).all(axis=1)
        if not finite.all() and not opts.skip_bad:
            raise SourceError(f"{info.path} row {start + int(np.argmin(finite))} holds NaN or inf: fix or "
                              "drop that row in every file of the shard, or pass --skip-bad to import such "
                              "rows as invalid")
        bad |= ~finite
        chunks[modality] = chunk
    keys = _bad_keys(scan, shard, start, end, bad)
    for chunk in chunks.values():
        chunk[bad] = 0  # an invalid row's features are zeros, as encode writes them
    for i, split in enumerate(SPLITS):
        sel = np.nonzero(code == i)[0]
        if not len(sel):
            continue
        skipped = [{"row_id": row_ids[split] + j, "sample_id": keys[int(r)],
                    "reason": f"NaN or inf in {shard.metadata.stem}'s embeddings, row {start + int(r)}"}
                   for j, r in enumerate(sel) if bad[r]]
        for modality, chunk in chunks.items():
            if (split, modality) in fills:
                fills[(split, modality)].add(chunk[sel], skipped)
    return int(bad.sum())


def _bad_keys(scan: Scan, shard: SourceShard, start: int, end: int, bad: np.ndarray) -> dict[int, str]:
    """Chunk row -> key of the rows in `bad` (read from the metadata only when there are any)."""
    if not bad.any():
        return {}
    want = set(np.nonzero(bad)[0].tolist())
    out = {}
    for row, key in enumerate(src.keys_of(shard.metadata, scan.key)):
        if start <= row < end and row - start in want:
            out[row - start] = key
        if row >= end:
            break
    return out


def _rows(scan: Scan, split: str, modality: str, skipped: set[int]) -> Iterator[RowMeta]:
    """Pass 3: the split's rows.jsonl lines, from the metadata again (never all held)."""
    code_of = SPLITS.index(split)
    names = [scan.key] + ([scan.caption] if scan.caption and modality == "text" else [])
    row_id = 0
    for shard, code in zip(scan.shards, scan.codes, strict=True):
        offset = 0
        for batch in src.read_columns(shard.metadata, names):
            n = len(batch[scan.key])
            for i in np.nonzero(code[offset:offset + n] == code_of)[0].tolist():
                key = str(batch[scan.key][i])
                text = batch[scan.caption][i] if len(names) > 1 else None
                yield RowMeta(row_id, key, key, None if text is None else str(text), row_id not in skipped)
                row_id += 1
            offset += n
