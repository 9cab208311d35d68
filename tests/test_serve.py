"""`m3jepa serve`: bad requests get a 4xx and serving goes on; the page in chromium; the real server."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="m3jepa serve needs fastapi (pip install -e .)")
from fastapi.testclient import TestClient  # noqa: E402

from m3jepa.search.media import media_roots, read_media, record_media  # noqa: E402
from m3jepa.serve import Engine, Limits, create_app  # noqa: E402
from m3jepa.serve.uploads import checked_suffix  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
NO_BROWSER = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
INJECTION = '<img src=x onerror="document.title=\'pwned\'"> & <b>bold</b>'


# ---------------------------------------------------------------- a fake search index and searcher


@dataclass(frozen=True)
class FakeHit:
    rank: int
    score: float
    row_id: int
    sample_id: str
    group_id: str
    caption: str | None
    media: str | None


HIT_FIELDS = ("row_id", "sample_id", "group_id", "caption", "media")


class FakeIndex:
    """A query "embedding" is a set of words; a row scores the share of them its caption holds."""

    def __init__(self, modality: str, rows: list[dict[str, Any]], roots: list[str] = ()) -> None:
        self.modality, self._rows, self.dim, self.roots = modality, rows, 4, list(roots)
        self.manifest = {"modality": modality}

    @property
    def rows(self) -> int:
        return len(self._rows)

    def row(self, i: int) -> dict[str, Any]:
        return dict(self._rows[i])

    def search(self, queries: list[frozenset[str]], k: int) -> list[list[FakeHit]]:
        out = []
        for words in queries:
            scored = [(len(words & set((row["caption"] or "").split())) / max(len(words), 1), i)
                      for i, row in enumerate(self._rows)]
            scored.sort(key=lambda t: (-t[0], t[1]))
            out.append([FakeHit(rank, score, **{f: self.row(i)[f] for f in HIT_FIELDS})
                        for rank, (score, i) in enumerate(scored[:k], 1)])
        return out


class FakeModel:
    """Embeds text as its set of words; records every batch. `gate` (if set) holds each call until set."""

    directions = ["image->text", "text->image"]
    device = "cpu"

    class source:  # noqa: N801 - mimics M3Model.source
        path, kind = "runs/fake", "run"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.entered, self.gate = threading.Event(), None

    def embed_query(self, texts: list[str], *, source: str, target: str) -> list[frozenset[str]]:
        assert f"{source}->{target}" in self.directions
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if "bad" in texts:
            raise ValueError("text input 'bad' is not valid text")
        self.batches.append(list(texts))
        return [frozenset(t.lower().split()) for t in texts]


class FakeSearcher:
    """The `m3jepa.search.Searcher` seam over a FakeIndex and a FakeModel: an image embeds as the colour
    (red, green or blue) of its first pixel; records every file."""

    def __init__(self, index: FakeIndex, model: FakeModel) -> None:
        self._index, self._model, self.files = index, model, []
        self._positions = {index.row(i)["row_id"]: i for i in range(index.rows)}

    @property
    def model(self) -> FakeModel:  # for the tests' own checks; the engine never reads it
        return self._model

    gallery = property(lambda self: self._index.modality)
    size = property(lambda self: self._index.rows)
    dim = property(lambda self: self._index.dim)
    directions = property(lambda self: list(self._model.directions))

    @property
    def sources(self) -> list[str]:
        return [d.split("->")[0] for d in self._model.directions if d.endswith("->" + self.gallery)]

    def describe_model(self) -> dict[str, Any]:
        return {"path": self._model.source.path, "kind": self._model.source.kind,
                "directions": self.directions, "device": "cpu", "query_encoder_precision": "fp32"}

    def shares_model(self, other: FakeSearcher) -> bool:
        return self._model is other._model

    def row(self, row_id: int) -> dict[str, Any] | None:
        position = self._positions.get(row_id)
        return None if position is None else self._index.row(position)

    def embedding_key(self, modality: str) -> tuple:
        return id(self._model), modality, self.gallery

    def embed_many(self, modality: str, values: list[str]) -> list[frozenset[str]]:
        assert modality in self.sources
        if modality == "image":
            out = []
            for value in values:
                path = Path(value)
                self.files.append((path, stat.S_IMODE(path.parent.stat().st_mode), path.read_bytes()))
                r, g, b = Image.open(path).convert("RGB").getpixel((0, 0))
                out.append(frozenset({max((r, "red"), (g, "green"), (b, "blue"))[1]}))
            return out
        return self._model.embed_query(list(values), source=modality, target=self.gallery)

    def search(self, queries: list[frozenset[str]], k: int) -> list[list[FakeHit]]:
        return self._index.search(queries, min(k, self.size))

    def media(self, row_id: int, where: str) -> bytes:  # the real check, over the rows' recorded files
        return read_media(self.row(row_id), self._index.roots, where)

    def query(self, modality: str, value: str, k: int = 10) -> list[FakeHit]:
        return self.search(self.embed_many(modality, [value]), k)[0]


COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def _png(colour: tuple[int, int, int], size: int = 24) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture
def gallery(tmp_path: Path) -> dict[str, FakeSearcher]:
    """Image rows (row ids 10.., a position map the media route must use) and their caption rows."""
    image_rows, text_rows = [], []
    roots = media_roots([tmp_path])

    def recorded(path: Path) -> dict[str, Any]:  # what `m3jepa index` records of a media file
        found, why = record_media(path, roots)
        assert found is not None, why
        return found

    for i, (name, colour) in enumerate(COLOURS.items()):
        (tmp_path / f"{name}.png").write_bytes(_png(colour))
        caption = f"a {name} square"
        image_rows.append({"row_id": 10 + i, "sample_id": f"s{i}", "group_id": name, "caption": caption,
                           **recorded(tmp_path / f"{name}.png")})
        text_rows.append({"row_id": 20 + i, "sample_id": f"t{i}", "group_id": name, "caption": caption,
                          "media": None})
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "no.png").write_bytes(_png((9, 9, 9)))
    image_rows += [
        {"row_id": 13, "sample_id": "s3", "group_id": "x", "caption": INJECTION, "media": None},
        {"row_id": 14, "sample_id": "s4", "group_id": "y", "caption": "a text file",
         **recorded(tmp_path / "notes.txt")},
        {"row_id": 15, "sample_id": "s5", "group_id": "z", "caption": "gone",
         **recorded(tmp_path / "no.png")},
    ]
    (tmp_path / "no.png").unlink()  # gone since it was indexed
    model = FakeModel()
    return {"image": FakeSearcher(FakeIndex("image", image_rows, roots), model),
            "text": FakeSearcher(FakeIndex("text", text_rows, roots), model)}


@pytest.fixture
def client(gallery) -> TestClient:
    app = create_app(Engine(gallery))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def _refused(r) -> tuple[int, str]:
    """(status, message) of a refusal, JSON: {"error": one line, "code": a stable snake_case name}."""
    body = r.json()
    assert set(body) == {"error", "code"} and body["code"].replace("_", "").isalpha(), body
    assert "\n" not in body["error"]
    return r.status_code, body["error"]


def _search_ok(client: TestClient) -> None:
    """The server still answers a good query after whatever came before."""
    r = client.post("/api/search", json={"text": "green", "k": 1, "index": "image"})
    assert r.status_code == 200 and r.json()["hits"][0]["caption"] == "a green square"


# ---------------------------------------------------------------- the seam


def test_the_server_reaches_indexes_and_the_model_only_through_the_searcher():
    """No module of m3jepa/serve reads a searcher's index or model (only `answer.index`, a name), and the
    fake searcher above offers nothing the real Searcher does not: the tests exercise the real seam."""
    import ast

    from m3jepa.search import Searcher

    reached = []
    for path in sorted((Path(__file__).resolve().parents[1] / "m3jepa" / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            named_answer = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "answer"
            if isinstance(node, ast.Attribute) and node.attr in ("index", "model", "_index", "_model") \
                    and not named_answer:
                reached.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not reached, reached
    public = {n for n in dir(FakeSearcher) if not n.startswith("_")} - {"files"}
    assert public <= {n for n in dir(Searcher) if not n.startswith("_")}


# ---------------------------------------------------------------- what works


def test_health_names_the_indexes_the_model_and_its_directions(client):
    body = client.get("/health").json()
    assert body == {
        "ok": True,
        "indexes": [{"name": "image", "modality": "image", "rows": 6, "dim": 4, "sources": ["text"]},
                    {"name": "text", "modality": "text", "rows": 3, "dim": 4, "sources": ["image"]}],
        "model": {"path": "runs/fake", "kind": "run", "directions": ["image->text", "text->image"],
                  "device": "cpu", "query_encoder_precision": "fp32"},
        "limits": Limits().as_json(),
        "stats": {"encoder_calls": 0, "encoded_queries": 0, "cached_embeddings": 0},
    }


def test_a_text_query_returns_ranked_hits_with_media_urls(client, gallery):
    r = client.post("/api/search", json={"text": "a blue thing", "k": 2})
    assert r.status_code == 200
    body = r.json()
    assert (body["index"], body["gallery"], body["direction"], body["k"]) == ("image", "image", "text->image",
                                                                              2)
    assert body["gallery_size"] == 6  # every answer says how many rows it searched
    assert body["hits"] == [
        {"rank": 1, "score": 2 / 3, "row_id": 12, "id": "s2", "group_id": "blue", "caption": "a blue square",
         "media": "/media/image/12"},
        {"rank": 2, "score": 1 / 3, "row_id": 10, "id": "s0", "group_id": "red", "caption": "a red square",
         "media": "/media/image/10"},
    ]
    # the same query as {"modality", "value"}; k above the gallery's size gives every row
    r = client.post("/api/search", json={"modality": "text", "value": "a blue thing", "k": 100})
    assert [h["row_id"] for h in r.json()["hits"]] == [12, 10, 11, 14, 13, 15]


def test_a_repeated_text_query_is_answered_from_the_cache(client, gallery):
    first = client.post("/api/search", json={"text": "red one", "k": 3}).json()
    again = client.post("/api/search", json={"text": "red one", "k": 1}).json()
    assert (first["cached"], again["cached"]) == (False, True)
    assert again["hits"] == first["hits"][:1]
    assert gallery["image"].model.batches == [["red one"]]  # the encoder ran once
    assert client.post("/api/search", json={"text": "Red one"}).json()["cached"] is False  # exact text only


def _query_in_thread(engine: Engine, text: str, out: dict[str, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out[text] = [h.caption for h in engine.search("image", "text", text, 1).hits]
        except ValueError as e:
            out[text] = str(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("bad", [False, True])
def test_queries_that_wait_for_the_encoder_are_embedded_in_one_call(gallery, bad):
    model = gallery["image"].model
    engine, model.gate, out = Engine(gallery), threading.Event(), {}
    try:
        first = _query_in_thread(engine, "red", out)
        _wait(model.entered.is_set)  # the encoder is busy with "red"; the next five wait for it
        texts = ["green one", "blue one", "bad" if bad else "a square", "red square", "blue"]
        threads = [_query_in_thread(engine, t, out) for t in texts]
        _wait(lambda: len(engine._batcher._pending) == 5)
        model.gate.set()
        for t in [first, *threads]:
            t.join(10)
    finally:
        engine.close()
    good = [t for t in texts if t != "bad"]
    # one bad query fails the shared call; then each is embedded alone and only the bad one fails
    assert model.batches == [["red"], *([[t] for t in good] if bad else [texts])]
    third = {"bad": "text input 'bad' is not valid text"} if bad else {"a square": ["a red square"]}
    assert out == {"red": ["a red square"], "green one": ["a green square"], "blue one": ["a blue square"],
                   "red square": ["a red square"], "blue": ["a blue square"], **third}
    assert engine.stats()["encoder_calls"] == len(model.batches)


def test_a_lone_client_never_waits_for_the_batch_window(gallery):
    model = gallery["image"].model
    engine = Engine(gallery, batch_window_s=30.0)  # a window no test could sit out
    try:
        start = time.monotonic()
        for text in ("red", "green one", "blue"):
            engine.search("image", "text", text, 1)
        assert time.monotonic() - start < 10
    finally:
        engine.close()
    assert model.batches == [["red"], ["green one"], ["blue"]]


@pytest.mark.parametrize("window", [0.0, 5.0])
def test_under_load_the_batcher_waits_for_as_many_queries_as_it_has_clients(gallery, window):
    """Two queries arrive while a call on one runs: three clients. The next call waits for the third,
    sent 0.2 s later, and goes as soon as it comes, long before the 5 s window ends. With no window the
    two go at once and the third alone (the batches alternate, as they did before the window)."""
    model = gallery["image"].model
    engine, model.gate, out = Engine(gallery, batch_window_s=window), threading.Event(), {}
    try:
        first = _query_in_thread(engine, "red", out)
        _wait(model.entered.is_set)
        pair = [_query_in_thread(engine, t, out) for t in ("green one", "blue one")]
        _wait(lambda: len(engine._batcher._pending) == 2)
        start = time.monotonic()
        model.gate.set()
        time.sleep(0.2)
        third = _query_in_thread(engine, "a square", out)
        for t in [first, *pair, third]:
            t.join(10)
        took = time.monotonic() - start
    finally:
        engine.close()
    rest = [["green one", "blue one", "a square"]] if window else [["green one", "blue one"], ["a square"]]
    assert model.batches == [["red"], *rest]
    assert took < 4  # the wait ended when the third query came, not at the end of the window
    assert out["a square"] == ["a red square"] and out["blue one"] == ["a blue square"]


def test_media_serves_the_file_a_row_records_with_security_headers(client, tmp_path):
    r = client.get("/media/image/12")  # row id 12 is index position 2
    assert r.status_code == 200 and r.content == (tmp_path / "blue.png").read_bytes()
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'none'" in r.headers["content-security-policy"]


def _replace_by_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def test_media_is_served_only_while_it_is_the_file_indexed(client, tmp_path, tmp_path_factory):
    """An image replaced after indexing by a link to a private file (outside the gallery, or inside it), or
    changed in place (other bytes, even of the same size), is refused; the page's other images still load."""
    private = tmp_path_factory.mktemp("home") / "id_rsa.png"
    private.write_bytes(b"-----BEGIN PRIVATE KEY-----")
    _replace_by_link(tmp_path / "red.png", private)  # row 10
    _replace_by_link(tmp_path / "green.png", tmp_path / "blue.png")  # row 11: a link inside the gallery
    blue = tmp_path / "blue.png"
    data = bytearray(blue.read_bytes())
    data[-20] ^= 0xFF  # row 12: same size, other bytes
    blue.write_bytes(bytes(data))
    moved = ("its media file is now a symbolic link (or under one) and is not served; rebuild the index if "
             "the gallery changed")
    assert _refused(client.get("/media/image/10")) == (403, f"row 10 of 'image': {moved}")
    assert client.get("/media/image/10").json()["code"] == "media_moved"
    assert _refused(client.get("/media/image/11")) == (403, f"row 11 of 'image': {moved}")
    r = client.get("/media/image/12")
    assert _refused(r) == (403, "row 12 of 'image': its media file changed since it was indexed (its size or "
                                "sha256 differs); not served: rebuild the index with `m3jepa index`")
    assert r.json()["code"] == "media_changed"
    blue.write_bytes(bytes(data[:-1]))  # another size
    assert client.get("/media/image/12").json()["code"] == "media_changed"


def test_an_uploaded_image_finds_its_captions_and_is_removed_after(client, gallery):
    r = client.post("/api/search/image", files={"file": ("q.png", _png(COLOURS["green"]), "image/png")},
                    data={"k": "2"})
    assert r.status_code == 200
    body = r.json()
    assert (body["index"], body["direction"]) == ("text", "image->text")
    assert [(h["caption"], h["media"]) for h in body["hits"]] == [("a green square", None),
                                                                 ("a red square", None)]
    (path, folder_mode, data), = gallery["text"].files
    assert data == _png(COLOURS["green"]) and path.suffix == ".png"
    assert folder_mode == 0o700 and not path.exists()  # private while held, gone once answered


def test_the_page_and_its_assets_are_served_without_inline_script(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script src="/static/app.js" defer></script>' in page.text and "<script>" not in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: the page works offline
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "textContent" in js.text and "innerHTML" not in js.text
    assert client.get("/static/style.css").status_code == 200


# ---------------------------------------------------------------- bad requests: 4xx, a message, still serving


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _upload(data: bytes, name: str = "q.png", **form: str) -> dict[str, Any]:
    return {"files": {"file": (name, data, "application/octet-stream")}, "data": form}


NO_AUDIO = ("no served index answers audio queries: the model's directions are image->text, text->image "
            "and the served indexes are image (image), text (text)")
BAD_JSON = [
    ({"text": ""}, 400, "the query is empty; give some text"),
    ({"text": "   \n"}, 400, "the query is empty; give some text"),
    ({"text": "x" * 2000}, 400, "the query is 2,000 characters; the limit is 1,000"),
    ({"text": "x" * 1_000_000}, 413, "the request body is 1,000,011 bytes; the limit here is 16,384 bytes"),
    ({"text": 5}, 400, "the query must be a string; got int"),
    ({"modality": "text", "value": None}, 400, "the query must be a string; got NoneType"),
    ({}, 400, 'no query: give {"text": "..."} (or modality and value)'),
    ({"text": "red", "modality": "text"}, 400, "give either text, or modality and value, not both"),
    ({"text": "red", "limit": 3}, 400, "unknown field(s) limit; a search takes text, modality, value, k, "
                                        "index"),
    ({"text": "red", "k": 0}, 400, "k must be a whole number from 1 to 100; got 0"),
    ({"text": "red", "k": 101}, 400, "k must be a whole number from 1 to 100; got 101"),
    ({"text": "red", "k": "ten"}, 400, "k must be a whole number from 1 to 100; got 'ten'"),
    ({"text": "red", "k": True}, 400, "k must be a whole number from 1 to 100; got True"),
    ({"text": "red", "k": 2.5}, 400, "k must be a whole number from 1 to 100; got 2.5"),
    ({"modality": "audio", "value": "x.wav"}, 400, NO_AUDIO),
    ({"text": "red", "index": "text"}, 400, "index 'text' (text) does not answer text queries; the model's "
                                             "directions are image->text, text->image"),
    ({"text": "red", "index": "nope"}, 404, "no index named 'nope'; served: image, text"),
    ({"text": "red", "index": 3}, 400, "index must be the name of a served index; got 3"),
    ({"modality": "image", "value": "/etc/passwd"}, 400, "image queries are file uploads: POST "
                                                         "/api/search/image with the file in a multipart "
                                                         "field named file"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_JSON, ids=range(len(BAD_JSON)))
def test_a_bad_json_search_is_refused_with_its_message(client, body, status, message):
    r = client.post("/api/search", json=body)
    assert _refused(r) == (status, message)
    _search_ok(client)


BAD_RAW = [
    (b"not json", "application/json", 400,
     "the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
    (b'["red"]', "application/json", 400,
     'the body must be a JSON object, e.g. {"text": "a red apple", "k": 10}'),
    (b'{"text": "red"}', "text/plain", 415, "send the search as JSON (Content-Type: application/json)"),
]


@pytest.mark.parametrize(("raw", "kind", "status", "message"), BAD_RAW, ids=range(len(BAD_RAW)))
def test_a_body_that_is_not_a_json_object_is_refused(client, raw, kind, status, message):
    r = client.post("/api/search", content=raw, headers={"content-type": kind})
    assert _refused(r) == (status, message)
    _search_ok(client)


BAD_UPLOADS = [
    ("image", _upload(b"GIF89a but not really"), 415,
     "the uploaded file is not an image of a served format (PNG, JPEG, GIF, WEBP, BMP)"),
    ("image", _upload(b"%PDF-1.4 hello", "q.pdf"), 415,
     "the uploaded file is not an image of a served format (PNG, JPEG, GIF, WEBP, BMP)"),
    ("image", _upload(_bomb_png(100_000, 100_000)), 413,
     "the image header claims more than 25,000,000 pixels (a decompression bomb?); refused before decoding"),
    ("image", _upload(_bomb_png(6_000, 6_000)), 413, "the image is 6,000 x 6,000 pixels; the limit is "
                                                      "25,000,000 pixels"),
    ("image", _upload(_png((1, 2, 3))[:60]), 400,
     "the image is corrupt or truncated: image file is truncated"),
    ("image", _upload(b""), 400, "the uploaded file is empty"),
    ("image", {"data": {"k": "3"}}, 400, "no file: send the query file in a multipart field named file"),
    ("image", _upload(_png((1, 2, 3)), k="0"), 400, "k must be a whole number from 1 to 100; got 0"),
    ("image", _upload(_png((1, 2, 3)), k="-4"), 400, "k must be a whole number from 1 to 100; got -4"),
    ("image", _upload(_png((1, 2, 3)), index="image"), 400,
     "index 'image' (image) does not answer image queries; the model's directions are image->text, "
     "text->image"),
    ("image", _upload(b"x" * (10 * 1024 * 1024 + 1)), 413, None),
    ("audio", _upload(b"RIFF....WAVE", "q.wav"), 400, NO_AUDIO),
    ("text", _upload(b"red"), 404, "no upload search for 'text': uploads are image, audio; text goes to POST "
                                   "/api/search as JSON"),
]


@pytest.mark.parametrize(("modality", "request_", "status", "message"), BAD_UPLOADS,
                         ids=range(len(BAD_UPLOADS)))
def test_a_bad_upload_is_refused_with_its_message(client, gallery, modality, request_, status, message):
    r = client.post(f"/api/search/{modality}", **request_)
    assert r.status_code == status
    if message is None:  # the body size in the message depends on the multipart boundary
        error = r.json()["error"]
        assert error.startswith("the request body is 10,485,9")
        assert error.endswith("bytes; the limit here is 10,485,760 bytes")
    else:
        assert _refused(r) == (status, message)
    assert gallery["text"].files == []  # nothing reached the model
    _search_ok(client)


BAD_MEDIA = [
    ("/media/nope/10", "no index named 'nope'"),
    ("/media/image/99", "index 'image' has no row '99'"),
    ("/media/image/2", "index 'image' has no row '2'"),  # a position, not a row id
    ("/media/image/-1", "index 'image' has no row '-1'"),
    ("/media/image/..%2F..%2Fetc%2Fpasswd", "Not Found"),  # no route takes a path: the row id is one segment
    ("/media/image/%2e%2e", "index 'image' has no row '..'"),
    ("/media/image/13", "row 13 of 'image' has no media file"),
    ("/media/image/14", "row 14 of 'image': .txt files are not served"),
    ("/media/image/15", "the media file of row 15 of 'image' is missing"),
    ("/media/text/20", "row 20 of 'text' has no media file"),
    ("/nothing/here", "Not Found"),
]


@pytest.mark.parametrize(("url", "message"), BAD_MEDIA, ids=range(len(BAD_MEDIA)))
def test_media_serves_only_files_the_index_records(client, url, message):
    r = client.get(url)
    assert _refused(r) == (404, message)
    _search_ok(client)


def test_a_foreign_host_header_is_refused_against_dns_rebinding(client):
    r = client.get("/health", headers={"host": "evil.example:8000"})
    assert _refused(r) == (400, "Host 'evil.example:8000' is not served: this server answers 127.0.0.1, "
                                "[::1], localhost only (a guard against DNS rebinding)")
    assert client.get("/health", headers={"host": "localhost:8000"}).status_code == 200
    _search_ok(client)


def test_a_chunked_body_is_cut_at_the_limit(client):
    def chunks():
        for _ in range(40):
            yield b"x" * 1024

    r = client.post("/api/search", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers  # sent chunked: only the running count can stop it
    assert _refused(r) == (413, "the request body passed the limit here of 16,384 bytes")
    _search_ok(client)


def test_an_upload_folder_is_private_and_each_file_goes_after_its_query(tmp_path):
    from m3jepa.serve.uploads import UploadFolder

    folder = UploadFolder()
    try:
        assert stat.S_IMODE(folder.path.stat().st_mode) == 0o700
        with pytest.raises(RuntimeError), folder.holding(b"abc", ".png") as path:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_bytes() == b"abc"
            raise RuntimeError("the query failed")
        assert list(folder.path.iterdir()) == []  # removed even when the query raised
    finally:
        folder.close()
    assert not folder.path.exists()


def test_sound_uploads_are_checked_from_their_header(tmp_path):
    import numpy as np
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, np.zeros(16000 * 61, np.float32), 16000, format="WAV")
    from m3jepa.serve.errors import RequestError

    with pytest.raises(RequestError, match=r"^the sound lasts 61\.0 s; the limit is 60 s$"):
        checked_suffix("audio", out.getvalue(), Limits())
    short = io.BytesIO()
    sf.write(short, np.zeros(1600, np.float32), 16000, format="FLAC")
    assert checked_suffix("audio", short.getvalue(), Limits()) == ".flac"


# ---------------------------------------------------------------- the page in a real browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer /health within {timeout} s")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(NO_BROWSER)
    pytest.importorskip("selenium", reason="needs selenium (pip install -e '.[dev]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _search_text(driver, url: str, query: str, index: str) -> list[tuple[int, str, str]]:
    """Type `query` into the page, submit, and read the grid: (row id, caption, image src) per figure."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 120)
    wait.until(lambda d: d.find_element(By.ID, "text-form").is_displayed())
    Select(driver.find_element(By.ID, "text-index")).select_by_value(index)
    box = driver.find_element(By.ID, "text-query")
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "text-submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure.hit"))
    wait.until(lambda d: d.execute_script(FIRST_IMAGE_DECODED))
    return [(int(f.get_attribute("data-row-id")), f.find_element(By.CSS_SELECTOR, ".caption").text,
             (f.find_elements(By.TAG_NAME, "img") or [None])[0] and
             f.find_element(By.TAG_NAME, "img").get_attribute("src"))
            for f in driver.find_elements(By.CSS_SELECTOR, "#results figure.hit")]


# a broken media URL leaves naturalWidth at 0
FIRST_IMAGE_DECODED = ("const i = document.querySelector('#results img'); "
                       "return i.complete && i.naturalWidth > 0")
ALL_IMAGES_DECODED = ("return [...document.querySelectorAll('#results img')]"
                      ".every(i => i.complete && i.naturalWidth > 0)")


def _search_file(driver, path: Path, index: str) -> list[tuple[int, str]]:
    """Upload `path` on the page and read the caption list: (row id, caption) per item."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    Select(driver.find_element(By.ID, "file-index")).select_by_value(f"image:{index}")
    driver.find_element(By.ID, "file-query").send_keys(str(path))
    driver.find_element(By.ID, "file-submit").click()
    WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results li.hit-caption"))
    return [(int(li.get_attribute("data-row-id")), li.find_element(By.CSS_SELECTOR, ".caption").text)
            for li in driver.find_elements(By.CSS_SELECTOR, "#results li.hit-caption")]


@pytest.fixture
def threaded_server(gallery):
    """The app over the fake searchers, served by uvicorn on a free loopback port in this process."""
    import uvicorn

    port = _free_port()
    app = create_app(Engine(gallery))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, timeout=30)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_the_page_shows_the_grid_and_escapes_every_caption(browser, threaded_server, tmp_path):
    from selenium.webdriver.common.by import By

    grid = _search_text(browser, threaded_server, "red square", "image")
    assert [(row, caption) for row, caption, _ in grid] == [
        (10, "a red square"), (11, "a green square"), (12, "a blue square"), (13, INJECTION),
        (14, "a text file"), (15, "gone")][: len(grid)]
    assert grid[0][2] == f"{threaded_server}/media/image/10"
    assert len(grid) == 6  # k = 10 on the page (the API's default), 6 rows
    assert browser.find_element(By.ID, "text-k").get_attribute("value") == str(Limits().default_k)
    assert browser.find_element(By.ID, "status").text.startswith("6 hits of 6 image rows in image")
    # the injected caption is text on the page, not markup: no image with src x ran its handler
    assert browser.title == "m3jepa search"
    markup = "return document.querySelectorAll('img[src=\"x\"], #results b').length"
    assert browser.execute_script(markup) == 0
    (tmp_path / "q.png").write_bytes(_png(COLOURS["blue"]))
    assert _search_file(browser, tmp_path / "q.png", "text")[0] == (22, "a blue square")


def test_a_results_page_opens_by_url(browser, threaded_server):
    """/?q=...&index=...&k=... renders the results (a link, a headless screenshot), and a search made on
    the page puts that URL in the address bar."""
    from urllib.parse import parse_qs, urlsplit

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{threaded_server}/?q=a%20blue%20thing&index=image&k=2")
    hits = "#results figure.hit"
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, hits)) == 2)
    figures = browser.find_elements(By.CSS_SELECTOR, hits)
    assert [int(f.get_attribute("data-row-id")) for f in figures] == [12, 10]  # as the API answers it
    assert browser.find_element(By.ID, "text-query").get_attribute("value") == "a blue thing"
    assert browser.find_element(By.ID, "status").text.startswith("2 hits of 6 image rows")
    grid = _search_text(browser, threaded_server, "green", "image")
    assert grid[0][1] == "a green square"
    assert parse_qs(urlsplit(browser.current_url).query) == {"q": ["green"], "index": ["image"], "k": ["10"]}
    browser.get(f"{threaded_server}/?q=red&index=nowhere")
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "error" in status.get_attribute("class"))
    assert "nowhere" in status.text and not browser.find_elements(By.CSS_SELECTOR, "#results figure.hit")


def test_the_page_shows_a_refusal_as_an_error_line(browser, threaded_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(threaded_server)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "text-form").is_displayed())
    browser.execute_script("document.getElementById('text-query').value = 'x'.repeat(1500)")
    browser.find_element(By.ID, "text-submit").click()
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, 30).until(lambda d: "error" in status.get_attribute("class"))
    assert status.text == "error 400: the query is 1,500 characters; the limit is 1,000"


# ---------------------------------------------------------------- the real server over a real index


def _m3jepa(*args: str, cwd: Path, timeout: float = 900) -> str:
    res = subprocess.run([sys.executable, "-m", "m3jepa", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_the_real_server_answers_the_page_as_the_search_command_does(browser, tmp_path, tuxpaint_run):
    """Index a small Tux Paint run's test images and captions with `m3jepa index`, start `m3jepa serve` on
    a free loopback port, and check the page against `m3jepa search` (the oracle)."""
    run = tuxpaint_run
    indexes = {}
    for modality in ("image", "text"):
        _m3jepa("index", "--run", str(run), "--split", "test", "--modality", modality, "--device", "cpu",
                cwd=tmp_path)
        indexes[modality] = run / "embedded" / "test" / f"{modality}.index"
    rows = [json.loads(line) for line in (indexes["text"] / "rows.jsonl").read_text().splitlines()]
    query = rows[0]["caption"]  # a test caption: its own image is among the answers to find
    want = json.loads(_m3jepa("search", "--index", str(indexes["image"]), "--text", query, "--k", "10",
                              "--json", "--device", "cpu", cwd=tmp_path))["hits"]
    port, log = _free_port(), (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", "serve", "--index", str(indexes["image"]),
                             "--index", str(indexes["text"]), "--port", str(port), "--device", "cpu",
                             "--threads", "1"],  # the hits must not depend on the thread count
                            cwd=tmp_path, env=ENV, stdout=log, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        grid = _search_text(browser, url, query, "image.index")
        assert [(row, caption) for row, caption, _ in grid] == [(h["row_id"], h["caption"]) for h in want]
        assert all(src == f"{url}/media/image.index/{row}" for row, _, src in grid)
        assert browser.execute_script(ALL_IMAGES_DECODED)
        image = Path(want[0]["media"])  # the top image file of the text query
        want_captions = json.loads(_m3jepa("search", "--index", str(indexes["text"]), "--image", str(image),
                                           "--k", "10", "--json", "--device", "cpu", cwd=tmp_path))["hits"]
        got = _search_file(browser, image, "text.index")
        assert got == [(h["row_id"], h["caption"]) for h in want_captions]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.seek(0)
        print(log.read()[-3000:])  # shown by pytest when the test failed
        log.close()


def _m3jepa_full(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "m3jepa", *args], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_your_own_photos_to_a_search_page_in_three_commands(tmp_path, tuxpaint_run, tuxpaint_root):
    """README's three commands: `m3jepa run tuxpaint` (the fixture), `m3jepa index --run R --images PHOTOS
    --out my.index`, `m3jepa serve --index my.index`. Then photos are added, removed and changed, and the
    same index command embeds only those (checked by counts, by the vectors, and by an unchanged file
    whose bytes were swapped behind an unchanged size and mtime: a rerun that re-read it would fail)."""
    import numpy as np

    pngs = sorted(tuxpaint_root.glob("food/fruit/*.png"))[:14]
    photos = tmp_path / "photos"
    for i, png in enumerate(pngs[:12]):  # nested folders, as a photo library has
        dest = photos / ("2023" if i < 6 else "2024/summer") / f"IMG_{i:04d}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, dest)
    (photos / "2023" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # skipped, one line
    (photos / "notes.txt").write_text("not a photo")  # not an image: left out
    (photos / ".thumbnails").mkdir()
    shutil.copyfile(pngs[0], photos / ".thumbnails" / "IMG_0000.png")  # hidden: left out
    index_args = ("index", "--run", str(tuxpaint_run), "--images", str(photos), "--out", "my.index",
                  "--device", "cpu")
    first = _m3jepa_full(*index_args, cwd=tmp_path)
    assert first.stdout.splitlines()[-1] == "12 images: 12 embedded, 0 reused, 0 removed, 1 skipped"
    assert [line for line in first.stderr.splitlines() if "skipped" in line and "broken.png" in line]
    before = np.load(tmp_path / "my.index" / "embeddings.npy")  # (12, d)
    rows_before = [json.loads(line)["sample_id"] for line in
                   (tmp_path / "my.index" / "rows.jsonl").read_text().splitlines()]

    (photos / "2023" / "IMG_0000.png").unlink()  # removed
    shutil.copyfile(pngs[12], photos / "2024" / "summer" / "IMG_0100.png")  # added
    changed = photos / "2023" / "IMG_0001.png"
    shutil.copyfile(pngs[13], changed)  # changed: other bytes (and another size or mtime)
    hidden_swap = photos / "2024" / "summer" / "IMG_0007.png"
    st = hidden_swap.stat()
    hidden_swap.write_bytes(b"\0" * st.st_size)  # garbage behind the same size and mtime
    os.utime(hidden_swap, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = _m3jepa_full(*index_args, cwd=tmp_path)
    assert second.stdout.splitlines()[-1] == "12 images: 2 embedded, 10 reused, 1 removed, 1 skipped"
    after = np.load(tmp_path / "my.index" / "embeddings.npy")
    rows_after = [json.loads(line)["sample_id"] for line in
                  (tmp_path / "my.index" / "rows.jsonl").read_text().splitlines()]
    assert "2023/IMG_0000.png" not in rows_after and "2024/summer/IMG_0100.png" in rows_after
    for key in set(rows_before) & set(rows_after) - {"2023/IMG_0001.png"}:  # reused bit for bit
        assert np.array_equal(before[rows_before.index(key)], after[rows_after.index(key)]), key
    old, new = before[rows_before.index("2023/IMG_0001.png")], after[rows_after.index("2023/IMG_0001.png")]
    assert not np.allclose(old, new)  # the changed photo was embedded again

    port, log = _free_port(), (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", "serve", "--index", "my.index", "--port",
                             str(port), "--device", "cpu"], cwd=tmp_path, env=ENV, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        import urllib.request

        with urllib.request.urlopen(f"{url}/?q=a+red+apple&index=my.index", timeout=30) as r:
            assert r.status == 200 and b"app.js" in r.read()  # the page (its script runs the URL's search)
        answer = _post_json(f"{url}/api/search", {"text": "a red apple"})
        assert (answer["index"], answer["gallery"], answer["gallery_size"]) == ("my.index", "image", 12)
        assert len(answer["hits"]) == 10 and all(h["id"] in rows_after for h in answer["hits"])
        top = answer["hits"][0]
        with urllib.request.urlopen(url + top["media"], timeout=30) as r:
            assert r.read() == (photos / top["id"]).read_bytes()  # the photo itself, from its folder
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


@pytest.mark.slow
def test_screenshot_of_the_page(browser, tmp_path):
    """docs/img/serve.png: the real server over the indexes in $M3JEPA_SERVE_INDEXES (image,text), the
    page after the text query $M3JEPA_SERVE_QUERY, saved to $M3JEPA_SERVE_SCREENSHOT (docs/serve.md)."""
    out, indexes = os.environ.get("M3JEPA_SERVE_SCREENSHOT"), os.environ.get("M3JEPA_SERVE_INDEXES")
    if not (out and indexes):
        pytest.skip("takes docs/img/serve.png only with M3JEPA_SERVE_SCREENSHOT and M3JEPA_SERVE_INDEXES set")
    image, text = indexes.split(",")
    port, log = _free_port(), (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "m3jepa", "serve", "--index", image, "--index", text,
                             "--port", str(port), "--device", "cpu"], env=ENV, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        grid = _search_text(browser, url, os.environ.get("M3JEPA_SERVE_QUERY", "a coin"), Path(image).name)
        assert len(grid) == 10 and browser.execute_script(ALL_IMAGES_DECODED)
        browser.save_screenshot(out)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_serve_refuses_zero_threads_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from m3jepa.cli import app

    res = CliRunner().invoke(app, ["serve", "--index", str(tmp_path), "--threads", "0"])
    assert res.exit_code == 2
    assert res.stderr.strip() == (
        "error: --threads 0 must be at least 1 (or left out for torch's and faiss's own)")


# ---------------------------------------------------------------- hostile requests to the real server


@pytest.fixture
def real_server(gallery, caplog):
    """`m3jepa serve`'s own uvicorn set-up (serve/http.py: the h11 protocol whose refusals are JSON) over the
    fake searchers, on a free loopback port in this process; its log goes to caplog."""
    import uvicorn

    from m3jepa.serve.http import server_config

    caplog.set_level(logging.WARNING)
    port = _free_port()
    server = uvicorn.Server(server_config(create_app(Engine(gallery)), "127.0.0.1", port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, timeout=30)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _raw(port: int, data: bytes, wait: float = 10) -> tuple[int, dict[bytes, bytes], bytes]:
    """(status, headers, body) of one raw HTTP exchange; the request must close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {k.lower(): v for k, v in (line.split(b": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    fields = {"Host": "127.0.0.1", "Connection": "close", "Content-Length": str(len(body)), **headers}
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in fields.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def _json_refusal(port: int, data: bytes) -> tuple[int, str, str]:
    status, headers, body = _raw(port, data)
    assert headers[b"content-type"] == b"application/json" and b"content-security-policy" in headers
    found = json.loads(body)
    assert set(found) == {"error", "code"} and "\n" not in found["error"], found
    return status, found["code"], found["error"]


def _refusal_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(("refused", "dropped"))]


HEAD = "POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
MALFORMED_HTTP = [
    (HEAD + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n{}   ").encode(),  # two lengths that differ
    (HEAD + "Content-Length: -1\r\n\r\n{}").encode(),  # a negative length
    b"GET /health HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n",  # a header line without its colon
]


def test_malformed_http_is_refused_in_json_with_one_log_line(real_server, caplog):
    from m3jepa.serve.http import BAD_HTTP

    for data in MALFORMED_HTTP:
        assert _json_refusal(real_server, data) == (400, "bad_http", BAD_HTTP)
    lines = _refusal_lines(caplog)
    assert len(lines) == len(MALFORMED_HTTP) and all(" 400 bad_http: " in line for line in lines), lines
    assert "Invalid HTTP request received." not in caplog.text  # uvicorn's own line: replaced by ours
    assert _raw(real_server, _request("GET", "/health"))[0] == 200


def _form(boundary: str, png: bytes, **fields: str) -> bytes:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
                 "Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_hostile_bodies_are_refused_in_json_with_a_stable_code(real_server, gallery, caplog):
    port, multipart = real_server, "multipart/form-data; boundary=XyZ"
    blue = _png(COLOURS["blue"])
    cases = [
        (_request("POST", "/api/search", b"[" * 6000, Content_Type="application/json"),
         (400, "bad_json", "the body is not a search: its JSON nests too deeply")),
        (_request("POST", "/api/search", b'{"text": "red", "k": ' + b"7" * 5000 + b"}",
                  Content_Type="application/json"),
         (400, "bad_json", "the body holds a 5,000-digit number; a search's numbers have at most 18 digits")),
        (_request("POST", "/api/search/image", _form("XyZ", blue, k="9" * 4000), Content_Type=multipart),
         (400, "bad_k", "k must be a whole number from 1 to 100; got a 4,000-digit number")),
        (_request("POST", "/api/search/image", _form("XyZ", blue, k="9" * 5000), Content_Type=multipart),
         (400, "bad_form", "the form cannot be read: Part exceeded maximum size of 4KB.")),
        (_request("GET", "/media/image/" + "1" * 5000),
         (404, "no_row", "index 'image' has no row '" + "1" * 173)),
        (_request("POST", "/api/search/image", _form("XyZ", blue)[:-60], Content_Type=multipart),
         (400, "truncated_body", "the multipart body (")),
        (_request("POST", "/api/search/image", _form("XyZ", blue), Content_Type=multipart,
                  Origin="http://evil.example"),
         (403, "cross_origin", "a POST from 'http://evil.example' is refused: only pages of this server "
                               "(127.0.0.1) may send searches to it")),
        (_request("POST", "/api/search", b'{"text": "red"}', Content_Type="application/json", Origin="null"),
         (403, "cross_origin", "a POST from 'null' is refused")),
    ]
    for blank in ("\u200b\u200d\ufeff", "\u0301\u0308", "\u3164 \u2800", " \u2060\u00ad "):
        body = json.dumps({"text": blank}).encode()
        cases.append((_request("POST", "/api/search", body, Content_Type="application/json"),
                      (400, "empty_query", "the query is empty; give some text")))
    for data, (status, code, message) in cases:
        got = _json_refusal(port, data)
        assert got[:2] == (status, code) and got[2].startswith(message), (got, message)
    assert gallery["text"].files == []  # no refused upload reached the model
    assert len(_refusal_lines(caplog)) == len(cases)
    ok = _request("POST", "/api/search/image", _form("XyZ", blue), Content_Type=multipart,
                  Origin=f"http://127.0.0.1:{port}", Host=f"127.0.0.1:{port}")
    status, _, body = _raw(port, ok)  # the same upload from the server's own page: answered
    assert status == 200 and json.loads(body)["hits"][0]["caption"] == "a blue square"


def test_clients_that_hang_up_mid_body_leave_one_line_each(real_server, caplog):
    partial = (HEAD + "Content-Length: 1000\r\n\r\n").encode() + b'{"text": "a red'
    for _ in range(300):
        with socket.create_connection(("127.0.0.1", real_server), timeout=10) as s:
            s.sendall(partial)  # and hang up
    deadline = time.time() + 60
    while len(_refusal_lines(caplog)) < 300 and time.time() < deadline:
        time.sleep(0.1)
    lines = _refusal_lines(caplog)
    assert len(lines) == 300 and all(line.startswith("dropped POST /api/search from 127.0.0.1:") and
                                     line.endswith(": the client hung up before its request was read")
                                     for line in lines)
    assert not [r for r in caplog.records if r.exc_info] and "Traceback" not in caplog.text
    status, _, body = _raw(real_server, _request("POST", "/api/search", b'{"text": "green", "k": 1}',
                                                 Content_Type="application/json"))
    assert status == 200 and json.loads(body)["hits"][0]["caption"] == "a green square"
