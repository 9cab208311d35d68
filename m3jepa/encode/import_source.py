"""`m3jepa stores import`, the source side: embeddings computed elsewhere, found, paired and checked.

The layout is clip-retrieval's inference output by default (`img_emb/img_emb_N.npy`,
`text_emb/text_emb_N.npy`, `metadata/metadata_N.parquet`, N zero-padded or not); other tools' `.npy` +
`.parquet` pairs are named by three glob patterns. Files of the three sets pair by N, the last run of digits
in the file name (one file per set needs none). Everything read is checked before a store is touched:
- each .npy by its header alone (np.lib.format: a 2-D float16/32/64 array, no pickled objects; loaded later
  with mmap_mode="r" and allow_pickle=False), each .parquet by its footer (row count, columns);
- the rows of a shard's image .npy, text .npy and .parquet agree; a dimension is the same in every shard;
- keys (the sample ids) are non-empty and unique; a split column holds train, val or test.
A bad file is a SourceError naming the file and the fix, raised before any store is written.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m3jepa.data.splits import SPLITS
from m3jepa.store.manifest import StoreError

CLIP_RETRIEVAL = {"image": "img_emb/img_emb_*.npy", "text": "text_emb/text_emb_*.npy",
                  "metadata": "metadata/metadata_*.parquet"}
KEY_COLUMNS = ("key", "image_path")  # clip-retrieval: `key` with --enable_metadata on webdataset input
FLOATS = ("float16", "float32", "float64")
BATCH_ROWS = 65536  # rows of a parquet column read at once (bounded memory on any file size)
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


class SourceError(StoreError):
    """Bad embeddings or metadata to import; the message names the file and the fix."""


@dataclass(frozen=True)
class NpyInfo:
    """An .npy file's header: rows, width, dtype."""

    path: Path
    rows: int
    dim: int
    dtype: str


@dataclass(frozen=True)
class SourceShard:
    """Shard N of the source: its metadata file and each modality's embeddings, `rows` rows each."""

    number: int
    metadata: Path
    arrays: dict[str, NpyInfo]  # modality -> its .npy
    rows: int


def local_source(value: str) -> Path:
    """SOURCE as a local folder. A URL is refused in one line: the .npy files are memory-mapped and read in
    place (a bucket would need a download per chunk); the stores, not the source, may be at a URL."""
    from m3jepa.location import redact

    if _SCHEME.match(value) and not value.lower().startswith("file://"):
        raise SourceError(f"{redact(value)}: the embeddings to import must be in a local folder (they are "
                          "memory-mapped); copy them down first (e.g. `aws s3 sync s3://bucket/emb emb`); "
                          "--store-root may be a URL (s3://bucket/prefix)")
    return Path(value[len("file://"):] if value.lower().startswith("file://") else value)


def npy_info(path: Path) -> NpyInfo:
    """The header of an .npy file, checked: 2-D, floating point, C or Fortran order, no Python objects."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0  # version 3.0 differs from 2.0 in name encoding only
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError) as e:
        raise SourceError(f"{path} is not an .npy file ({e}); write it with numpy.save") from None
    if dtype.hasobject:
        raise SourceError(f"{path} holds Python objects (a pickle), which m3jepa never loads; save a float "
                          "array instead: np.save(path, np.asarray(embeddings, dtype=np.float32))")
    if len(shape) != 2:
        raise SourceError(f"{path} has shape {shape} (ndim {len(shape)}); embeddings must be (rows, dim): "
                          "reshape to 2-D before np.save")
    if dtype.name not in FLOATS:
        raise SourceError(f"{path} holds {dtype}, not float16/32/64 embeddings; save them as float32")
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise SourceError(f"{path} is truncated ({path.stat().st_size} bytes, its header needs {need}); "
                          "copy it again from where it was written")
    del fortran  # either order reads the same rows through a memory map
    return NpyInfo(path, int(shape[0]), int(shape[1]), dtype.name)


def open_npy(info: NpyInfo) -> np.ndarray:
    """The rows of a checked .npy as a read-only memory map (never unpickled, never read whole)."""
    return np.load(info.path, mmap_mode="r", allow_pickle=False)


def _numbered(root: Path, pattern: str, what: str) -> dict[int, Path]:
    files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise SourceError(f"no {what} files match {root / pattern}; point the import at a clip-retrieval "
                          f"output folder, or name the files with --{what}-glob")
    if len(files) == 1:
        m = _NUMBER.search(files[0].stem)
        return {int(m.group(1)) if m else 0: files[0]}
    out: dict[int, Path] = {}
    for p in files:
        m = _NUMBER.search(p.stem)
        if m is None:
            raise SourceError(f"{p} has no shard number in its name, but {len(files)} {what} files match "
                              f"{pattern}: name them NAME_N{p.suffix} so they pair by N")
        n = int(m.group(1))
        if n in out:
            raise SourceError(f"{out[n]} and {p} are both shard {n}: remove one (two exports mixed?)")
        out[n] = p
    return out


def find_shards(root: Path, globs: dict[str, str | None], allow_gaps: bool = False) -> list[SourceShard]:
    """The source's shards in number order: files paired by N, headers and row counts checked."""
    if not root.is_dir():
        raise SourceError(f"{root} is not a folder; give the folder clip-retrieval wrote (img_emb/, "
                          "text_emb/, metadata/)")
    sets = {what: _numbered(root, g, what) for what, g in globs.items() if g}
    numbers = sorted(sets["metadata"])
    for files in sets.values():
        for other, files2 in sets.items():
            extra = sorted(set(files) - set(files2))
            if extra:
                n = extra[0]
                raise SourceError(f"{files[n]} has no {other} file of shard {n} (matching "
                                  f"{globs[other]}): copy it, or move {files[n].name} out of the folder")
    gaps = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    if gaps and not allow_gaps:
        raise SourceError(f"shard {gaps[0]} is missing between {numbers[0]} and {numbers[-1]} "
                          f"({len(gaps)} missing in all): copy the missing files, or pass --allow-gaps "
                          "if those partitions were empty")
    shards = []
    for n in numbers:
        meta = sets["metadata"][n]
        arrays = {m: npy_info(sets[m][n]) for m in ("image", "text") if m in sets}
        rows = parquet_rows(meta)
        for info in arrays.values():
            if info.rows != rows:
                raise SourceError(f"{info.path} has {info.rows} rows but {meta} has {rows}: they must be the "
                                  "same samples in the same order; re-export the shard")
        shards.append(SourceShard(n, meta, arrays, rows))
    for modality in ("image", "text"):
        dims = {s.arrays[modality].dim for s in shards if modality in s.arrays}
        if len(dims) > 1:
            one = shards[0].arrays[modality]
            other = next(s.arrays[modality] for s in shards if s.arrays[modality].dim != one.dim)
            raise SourceError(f"{other.path} is {other.dim}-d but {one.path} is {one.dim}-d: one import "
                              "holds one encoder's embeddings; import the other files on their own")
    return shards


def _pq():
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # a dependency since stores import; an old environment may lack it
        raise SourceError("reading .parquet metadata needs pyarrow: pip install pyarrow") from e
    return pq


def _parquet(path: Path):
    try:
        return _pq().ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: one line whatever it is
        raise SourceError(f"{path} is not a readable .parquet file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); export it again") from None


def parquet_rows(path: Path) -> int:
    """Rows of a parquet file, from its footer."""
    return _parquet(path).metadata.num_rows


def columns(path: Path) -> list[str]:
    return list(_parquet(path).schema_arrow.names)


def key_column(path: Path, asked: str | None) -> str:
    """The column naming each sample: `asked`, else the first of KEY_COLUMNS the file has."""
    names = columns(path)
    if asked is not None:
        if asked not in names:
            raise SourceError(f"{path} has no column {asked!r} (it has {', '.join(names)}); pass "
                              "--key-column with one of them")
        return asked
    for name in KEY_COLUMNS:
        if name in names:
            return name
    raise SourceError(f"{path} has none of the key columns {', '.join(KEY_COLUMNS)} (it has "
                      f"{', '.join(names)}); pass --key-column naming the column that identifies each sample")


def check_column(path: Path, name: str | None, option: str) -> None:
    if name is not None and name not in columns(path):
        raise SourceError(f"{path} has no column {name!r} (it has {', '.join(columns(path))}); fix "
                          f"{option}, or leave it out")


def read_columns(path: Path, names: list[str]) -> Iterator[dict[str, list]]:
    """The named columns of a parquet file, BATCH_ROWS rows at a time, as Python lists."""
    for batch in _parquet(path).iter_batches(batch_size=BATCH_ROWS, columns=names):
        yield {n: batch.column(n).to_pylist() for n in names}


def keys_of(path: Path, column: str, offset: int = 0) -> Iterator[str]:
    """Each row's key as a string; an empty or missing key is a SourceError naming the row."""
    row = offset
    for batch in read_columns(path, [column]):
        for value in batch[column]:
            if value is None or str(value) == "":
                raise SourceError(f"{path} row {row - offset}: column {column!r} is empty; every sample "
                                  "needs a key (pass --key-column with a column that has one for every row)")
            yield str(value)
            row += 1


def split_of(path: Path, row: int, value: object, column: str) -> str:
    if value not in SPLITS:
        raise SourceError(f"{path} row {row}: column {column!r} is {value!r}, not one of "
                          f"{', '.join(SPLITS)}; fix the column, or leave out --split-column to split by a "
                          "seeded hash of the key")
    return str(value)


def key_hash(key: str) -> int:
    """64 bits of a key, for finding repeated keys without holding every key."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def fingerprint(shards: list[SourceShard], root: Path, content_hash: str) -> list[str]:
    """One line per source file: its path under `root` and size and mtime ("stat"), or its sha256."""
    lines = []
    for s in shards:
        for p in (s.metadata, *(a.path for a in s.arrays.values())):
            st = p.stat()
            if content_hash == "sha256":
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        h.update(block)
                what = f"sha256:{h.hexdigest()}"
            else:
                what = f"stat:{st.st_size}:{st.st_mtime_ns}"
            lines.append(f"{p.relative_to(root).as_posix()}\t{what}")
    return lines
