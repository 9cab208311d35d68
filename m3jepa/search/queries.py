"""Query latents from a .npy file (`m3jepa search --latents`): embeddings a user made with the tool that
made an imported store, read as untrusted input and checked before any row reaches the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m3jepa.search.errors import SearchError

MAX_QUERY_ROWS = 10_000  # one command's queries; a bigger file is split (each query prints a table)
DTYPES = ("float16", "float32", "float64")
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"  # an .npz archive (np.savez) is a zip file


def read_query_latents(path: str | Path, modality: str, width: int,
                       max_rows: int = MAX_QUERY_ROWS) -> np.ndarray:
    """(N, width) float32 rows of the .npy file at `path`, (width,) read as one row; every refusal is one
    SearchError naming the file and the fix. The header (dtype, shape) is checked before any data is read,
    so a huge or foreign file costs nothing; pickles are never loaded (`allow_pickle=False`)."""
    path = Path(path)
    fix = f"save an (N, {width}) or ({width},) float32 array of {modality} latents with numpy.save"
    if not path.is_file():
        raise SearchError(f"--latents {path} is not a file; {fix}")
    try:
        with path.open("rb") as f:
            shape, dtype = _header(f, path, fix)
            _check_header(path, shape, dtype, modality, width, max_rows, fix)
            f.seek(0)
            array = np.load(f, allow_pickle=False)
    except SearchError:
        raise
    except (OSError, ValueError, EOFError) as e:  # a truncated body, an unreadable file
        raise SearchError(f"--latents {path} cannot be read ({_first_line(e)}); {fix}") from None
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused below
        rows = array.reshape(-1, width).astype(np.float32)  # (N, width): what the model is given
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        wider = " (or a float64 beyond float32's range)" if array.dtype == np.float64 else ""
        raise SearchError(f"--latents {path}: {int(bad.sum())} of {len(rows)} rows hold NaN or infinite "
                          f"values{wider}, the first row {first}; write finite latents")
    return rows


def _header(f, path: Path, fix: str) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of an .npy file's header, the file positioned after it."""
    head = f.read(len(NPY_MAGIC))
    f.seek(0)
    if head.startswith(ZIP_MAGIC):
        raise SearchError(f"--latents {path} is an .npz archive (numpy.savez); {fix}")
    if head != NPY_MAGIC:
        raise SearchError(f"--latents {path} is not an .npy file (no NUMPY header); {fix}")
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"header version {version[0]}.{version[1]} is not 1.0 or 2.0")
    except (ValueError, SyntaxError, EOFError) as e:  # numpy reads the header dict with a literal parser
        raise SearchError(f"--latents {path} has a damaged .npy header ({_first_line(e)}); {fix}") from None
    return tuple(shape), np.dtype(dtype)


def _check_header(path: Path, shape: tuple[int, ...], dtype: np.dtype, modality: str, width: int,
                  max_rows: int, fix: str) -> None:
    if dtype.fields is not None or dtype.kind == "O" or dtype.name not in DTYPES:
        raise SearchError(f"--latents {path} holds {dtype} values, not one of {', '.join(DTYPES)}; {fix}")
    if len(shape) not in (1, 2):
        raise SearchError(f"--latents {path} has shape {shape}, not (N, {width}) or ({width},); {fix}")
    if shape[-1] != width:
        raise SearchError(f"--latents {path} rows are {shape[-1]}-d, the model's {modality} latents "
                          f"{width}-d; embed the queries with the encoder that made the model's "
                          f"{modality} store (its stage-1 space)")
    rows = shape[0] if len(shape) == 2 else 1
    if rows == 0:
        raise SearchError(f"--latents {path} holds no rows; {fix}")
    if rows > max_rows:
        raise SearchError(f"--latents {path} holds {rows:,} rows, over {max_rows:,} for one command; split "
                          "it into files of at most that many rows (or use Searcher.query_latents)")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
