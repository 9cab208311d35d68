"""`m3jepa search --latents`: queries embedded elsewhere, read from an untrusted .npy, searched through the
model exactly as a stored row is (checked against `--text` on a run encoded by the offline encoders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from m3jepa.search.errors import SearchError
from m3jepa.search.queries import MAX_QUERY_ROWS, read_query_latents
from m3jepa.store import open_store, store_path

WIDTH = 384  # MiniLM-L6's pooled text latents


def _cli(*args: str):
    from m3jepa.cli import app

    return CliRunner().invoke(app, ["search", *args, "--device", "cpu"])


def _json(stdout: str):
    return json.loads(stdout[min(i for i in (stdout.find("["), stdout.find("{")) if i >= 0):])


# ---------------------------------------------------------------- the real run


@pytest.fixture(scope="module")
def image_index(tuxpaint_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "image.index"
    from m3jepa.cli import app

    res = CliRunner().invoke(app, ["index", "--run", str(tuxpaint_run), "--split", "test", "--modality",
                                   "image", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def text_store(tuxpaint_run):
    """The run's own test caption store: MiniLM-L6 latents of each caption, float16, made by `encode`."""
    root = tuxpaint_run.parents[1] / "stores"
    store = open_store(store_path(root, "tuxpaint", "test", "text", "minilm-l6"))
    assert store.manifest.dtype == "float16" and store.manifest.dim == WIDTH
    return store


@pytest.mark.slow
def test_stored_caption_latents_find_what_the_captions_find(image_index, text_store, tmp_path):
    """Three stored caption rows as a float16 (3, 384) file give, per row, the hits `--text` gives for the
    caption the row was encoded from: the same rows in the same order, the same scores (the raw query is
    rounded through the store's float16 as well)."""
    rows = [0, 7, 21]
    captions = [text_store.rows.texts[r] for r in rows]
    latents = text_store.read_all()[rows].astype(np.float16)  # exact: the stored values
    np.save(tmp_path / "q.npy", latents)
    res = _cli("--index", str(image_index), "--latents", str(tmp_path / "q.npy"), "--source", "text",
               "--k", "5", "--json")
    assert res.exit_code == 0, res.output
    answers = _json(res.stdout)
    assert [a["query"] for a in answers] == [{"latents": str(tmp_path / "q.npy"), "source": "text", "row": i}
                                             for i in range(3)]
    for caption, answer in zip(captions, answers, strict=True):
        res = _cli("--index", str(image_index), "--text", caption, "--k", "5", "--json")
        assert res.exit_code == 0, res.output
        want = _json(res.stdout)["hits"]
        assert [h["row_id"] for h in answer["hits"]] == [h["row_id"] for h in want]
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h["score"] for h in want],
                                   atol=1e-5)
        assert (answer["gallery"], answer["k"]) == ("image", 5)

    # one (384,) float32 row, the source inferred (text is the only modality searching images): the
    # first answer again, as a table
    np.save(tmp_path / "one.npy", latents[0].astype(np.float32))
    res = _cli("--index", str(image_index), "--latents", str(tmp_path / "one.npy"), "--k", "2")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    size = answers[0]["gallery_size"]
    assert lines[0] == (f"image gallery {image_index}: top 2 of {size} rows for each of 1 text latents in "
                        f"{tmp_path / 'one.npy'}")
    table = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [int(t[2]) for t in table] == [h["row_id"] for h in answers[0]["hits"][:2]]


@pytest.mark.slow
def test_bad_latents_through_the_cli_are_one_line(image_index, tmp_path):
    """Through the command: exit 2, one line naming the file and the fix, no traceback; the options that
    do not go together are refused before the model loads."""
    np.save(tmp_path / "narrow.npy", np.zeros((2, 383), np.float32))
    res = _cli("--index", str(image_index), "--latents", str(tmp_path / "narrow.npy"))
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        f"error: --latents {tmp_path / 'narrow.npy'} rows are 383-d, the model's text latents 384-d; embed "
        "the queries with the encoder that made the model's text store (its stage-1 space)"]
    np.save(tmp_path / "ok.npy", np.ones((1, WIDTH), np.float32))
    res = _cli("--index", str(image_index), "--latents", str(tmp_path / "ok.npy"), "--source", "image")
    assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
        "error: the model was not trained for image->image; its directions are image->text, text->image"]
    for args, line in (
        (("--latents", str(tmp_path / "ok.npy"), "--text", "a cat"),
         "give exactly one of --text, --image, --audio, --latents"),
        (("--text", "a cat", "--source", "text"),
         "--source names the modality of --latents; --text, --image and --audio name their own"),
    ):
        res = _cli("--index", str(image_index), *args)
        assert res.exit_code == 2 and res.stderr.strip().splitlines() == [f"error: {line}"], res.output


# ---------------------------------------------------------------- the file, untrusted


def _fix() -> str:
    return f"; save an (N, {WIDTH}) or ({WIDTH},) float32 array of text latents with numpy.save"


def _raw_npy(path: Path, header: dict, body: bytes = b"") -> Path:
    """An .npy whose header says what the test wants, whatever its body holds."""
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # the magic, then the header
        f.write(body)
    return path


class _Boom:
    """A pickle that, if ever loaded, writes a file: the proof that nothing was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_read_query_latents_gives_float32_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, WIDTH))
    for dtype in ("float16", "float32", "float64", ">f4"):
        np.save(tmp_path / "x.npy", x.astype(dtype))
        got = read_query_latents(tmp_path / "x.npy", "text", WIDTH)
        assert got.dtype == np.float32 and got.shape == (4, WIDTH)
        np.testing.assert_array_equal(got, x.astype(dtype).astype(np.float32))
    np.save(tmp_path / "row.npy", x[1])  # (D,): one query
    np.testing.assert_array_equal(read_query_latents(tmp_path / "row.npy", "text", WIDTH),
                                  x[1:2].astype(np.float32))
    np.save(tmp_path / "f.npy", np.asfortranarray(x))  # column-major: numpy reads it back in order
    np.testing.assert_array_equal(read_query_latents(tmp_path / "f.npy", "text", WIDTH), x.astype(np.float32))


def _case(tmp_path: Path, name: str) -> tuple[Path, str]:
    """The file of one bad case and the message after `--latents PATH `."""
    p = tmp_path / f"{name}.npy"
    fix = _fix()
    if name == "missing":
        return p, "is not a file" + fix
    if name == "a_folder":
        p.mkdir()
        return p, "is not a file" + fix
    if name == "text":
        p.write_text("0.1, 0.2, 0.3\n")
        return p, "is not an .npy file (no NUMPY header)" + fix
    if name == "npz":
        with p.open("wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, q=np.zeros((1, WIDTH), np.float32))
        return p, "is an .npz archive (numpy.savez)" + fix
    if name == "pickle":
        np.save(p, np.array([_Boom(tmp_path / "unpickled"), 1], dtype=object), allow_pickle=True)
        return p, "holds object values, not one of float16, float32, float64" + fix
    if name == "int":
        np.save(p, np.ones((2, WIDTH), np.int64))
        return p, "holds int64 values, not one of float16, float32, float64" + fix
    if name == "complex":
        np.save(p, np.ones((2, WIDTH), np.complex64))
        return p, "holds complex64 values, not one of float16, float32, float64" + fix
    if name == "structured":
        np.save(p, np.zeros(2, dtype=[("a", "<f4", (WIDTH,))]))
        return p, "holds [('a', '<f4', (384,))] values, not one of float16, float32, float64" + fix
    if name == "three_d":
        np.save(p, np.zeros((2, 1, WIDTH), np.float32))
        return p, f"has shape (2, 1, {WIDTH}), not (N, {WIDTH}) or ({WIDTH},)" + fix
    if name == "scalar":
        np.save(p, np.float32(1))
        return p, f"has shape (), not (N, {WIDTH}) or ({WIDTH},)" + fix
    if name == "wide":
        np.save(p, np.zeros((2, 512), np.float32))
        return p, ("rows are 512-d, the model's text latents 384-d; embed the queries with the encoder that "
                   "made the model's text store (its stage-1 space)")
    if name == "empty":
        np.save(p, np.zeros((0, WIDTH), np.float32))
        return p, "holds no rows" + fix
    if name == "too_many":  # the header alone claims it: refused before the (absent) body is read
        _raw_npy(p, {"descr": "<f2", "fortran_order": False, "shape": (MAX_QUERY_ROWS + 1, WIDTH)})
        return p, (f"holds {MAX_QUERY_ROWS + 1:,} rows, over {MAX_QUERY_ROWS:,} for one command; split it "
                   "into files of at most that many rows (or use Searcher.query_latents)")
    if name == "truncated":
        _raw_npy(p, {"descr": "<f4", "fortran_order": False, "shape": (5, WIDTH)}, b"\0" * (4 * WIDTH))
        return p, "cannot be read (...)" + fix
    if name == "bad_header":
        p.write_bytes(np.lib.format.magic(1, 0) + b"\x10\x00{'descr': <f4, }\n")
        return p, "has a damaged .npy header"
    if name == "nan":
        x = np.ones((4, WIDTH), np.float32)
        x[2, 5], x[3, 0] = np.nan, -np.inf
        np.save(p, x)
        return p, "2 of 4 rows hold NaN or infinite values, the first row 2; write finite latents"
    if name == "beyond_float32":
        x = np.ones((3, WIDTH))
        x[1, 0] = 1e300  # finite in the file, infinite as the float32 the model takes
        np.save(p, x)
        return p, ("1 of 3 rows hold NaN or infinite values (or a float64 beyond float32's range), the first "
                   "row 1; write finite latents")
    raise ValueError(name)


CASES = ["missing", "a_folder", "text", "npz", "pickle", "int", "complex", "structured", "three_d", "scalar",
         "wide", "empty", "too_many", "truncated", "bad_header", "nan", "beyond_float32"]


@pytest.mark.parametrize("name", CASES)
def test_a_bad_latents_file_is_one_line_naming_it_and_the_fix(tmp_path, name):
    path, want = _case(tmp_path, name)
    with pytest.raises(SearchError) as e:
        read_query_latents(path, "text", WIDTH)
    message = str(e.value)
    assert "\n" not in message
    sep = ": " if name in ("nan", "beyond_float32") else " "
    if name == "bad_header":
        assert message.startswith(f"--latents {path} has a damaged .npy header (")
        assert message.endswith(_fix())
    elif name == "truncated":  # numpy's own words after "cannot be read (" vary by version
        assert message.startswith(f"--latents {path} cannot be read (") and message.endswith(_fix())
    else:
        assert message == f"--latents {path}{sep}{want}"
    assert not (tmp_path / "unpickled").exists()  # no pickle was ever loaded
