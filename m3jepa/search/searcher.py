"""`Searcher`: a model and an index it serves; embeds queries (captions or files) and searches.

It is the one seam between a search index with its model and whatever serves them (`m3jepa search`,
`m3jepa serve`): what is served, how a query is embedded and searched, and a row's metadata all go
through it, so a check on what is served belongs here.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.search.errors import SearchError
from m3jepa.search.identity import load_model, model_ref, sources_into
from m3jepa.search.index import Hit, SearchIndex
from m3jepa.search.media import MediaRefused, read_media

FILE_MODALITIES = ("image", "audio")  # their query value is a file path; "text" takes the caption itself
# What renders as nothing besides whitespace: format characters (zero-width space and joiners, the BOM, bidi
# marks: Cf), combining marks with nothing to combine with (Mn, Me), controls (Cc), and the few letters and
# symbols drawn blank (Hangul fillers, the braille blank, the Mongolian vowel separator).
BLANK_CATEGORIES = frozenset({"Cf", "Mn", "Me", "Cc", "Zs", "Zl", "Zp"})
BLANK_CHARACTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")


def is_blank(text: str) -> bool:
    """Whether a caption shows nothing: empty, or only whitespace and invisible characters."""
    return all(ch.isspace() or ch in BLANK_CHARACTERS or unicodedata.category(ch) in BLANK_CATEGORIES
               for ch in text)


class Searcher:
    """Queries of any trained direction X->M against an index of gallery modality M.

    Thread-safe: the model's forward runs under the model's own lock (`M3Model.lock`, one per model
    however many Searchers share it); the faiss search runs outside it, concurrently."""

    def __init__(self, index: SearchIndex, model: Any):
        if index.modality is None:
            raise SearchError(f"{index.path} names no gallery modality (built from bare vectors); build it "
                              "with `m3jepa index`")
        self._index = index
        self._model = model
        want = index.model
        if want is not None and model_ref(model).weights_sha256 != want.weights_sha256:
            raise SearchError(f"{index.path} was built with the model at {want.path} (other weights than "
                              f"the model given, {model.source.path}); rebuild it with `m3jepa index`")
        if not self.sources:
            raise SearchError(f"the model trains no direction into {index.modality} (its directions are "
                              f"{', '.join(model.directions)}); it cannot search {index.path}")
        probe = self._embed(self.sources[0], latents=np.zeros((1, model.objective.predictor.dims[
            self.sources[0]]), np.float32))  # (1, d)
        if probe.shape[1] != index.dim:
            raise SearchError(f"{index.path} holds {index.dim}-d vectors, the model embeds "
                              f"{probe.shape[1]}-d; rebuild the index with this model")
        # hits name a row by its store row id; the index reads rows by position (invalid rows are left out)
        self._positions = {index.row(i)["row_id"]: i for i in range(index.rows)}

    @classmethod
    def open(cls, index_path: str | Path, device: str = "auto",
             query_encoder_precision: str = "fp32") -> Searcher:
        """Open the index and load the model it names (refused when its weights changed since);
        `query_encoder_precision="int8"`: text queries through the int8 MiniLM (m3jepa.load)."""
        index = SearchIndex.open(index_path)
        ref = index.model
        if ref is None:
            raise SearchError(f"{index_path} names no model; build it with `m3jepa index`")
        return cls(index, load_model(ref, device, Path(index_path), query_encoder_precision))

    @classmethod
    def open_all(cls, paths: Mapping[str, str | Path], device: str = "auto",
                 query_encoder_precision: str = "fp32") -> dict[str, Searcher]:
        """name -> Searcher of each index, all over ONE model (the first index's, loaded once); an index
        built with other weights is refused."""
        out: dict[str, Searcher] = {}
        for name, path in paths.items():
            first = next(iter(out.values()), None)
            out[name] = (cls.open(path, device, query_encoder_precision) if first is None
                         else first.sibling(path))
        return out

    def sibling(self, index_path: str | Path) -> Searcher:
        """A Searcher of another index over this one's model (and so its lock)."""
        return type(self)(SearchIndex.open(index_path), self._model)

    # ------------------------------------------------------------ what is served

    @property
    def index(self) -> SearchIndex:
        """The opened index (read-only use: the manifest, rows, search)."""
        return self._index

    @property
    def model(self) -> Any:
        """The `M3Model` the queries go through."""
        return self._model

    @property
    def gallery(self) -> str:
        """The gallery modality, e.g. "image"."""
        return str(self._index.modality)

    @property
    def size(self) -> int:
        """How many rows the index holds: the gallery size every answer reports."""
        return self._index.rows

    @property
    def dim(self) -> int:
        return self._index.dim

    @property
    def sources(self) -> list[str]:
        """The query modalities the model can use against this index, from its directions."""
        return sources_into(self._model.directions, self._index.modality)

    @property
    def directions(self) -> list[str]:
        return list(self._model.directions)

    def source_dim(self, modality: str) -> int:
        """The width of `modality`'s stage-1 latents, what `query_latents` takes (D_modality)."""
        self._check_source(modality)
        return int(self._model.objective.predictor.dims[modality])

    def describe_model(self) -> dict[str, Any]:
        """The model: its path, kind, directions, device and query encoder precision."""
        m = self._model
        source = getattr(m, "source", None)
        return {"path": str(getattr(source, "path", "")), "kind": getattr(source, "kind", None),
                "directions": list(m.directions), "device": str(getattr(m, "device", "")),
                "query_encoder_precision": getattr(m, "query_encoder_precision", "fp32")}

    def shares_model(self, other: Searcher) -> bool:
        return self._model is other._model

    def row(self, row_id: int) -> dict[str, Any] | None:
        """The metadata (row_id, sample_id, group_id, caption, media) of store row `row_id`, or None if
        the index does not hold it."""
        position = self._positions.get(row_id)
        return None if position is None else self._index.row(position)

    def media(self, row_id: int, where: str) -> bytes:
        """The bytes of store row `row_id`'s media file, only while it is the regular file the index
        recorded (its real path inside the gallery's roots, its size and sha256); `MediaRefused` (404/403)
        otherwise, its message naming the row as `where` (search/media.py)."""
        row = self.row(row_id)
        if row is None:
            raise MediaRefused(404, "no_row", f"{where} is not in the index")
        return read_media(row, self._index.media_roots, where)

    # ------------------------------------------------------------ queries

    def embedding_key(self, modality: str) -> Hashable:
        """Queries with equal keys embed alike (same model, same direction): they may share one model
        call and one cache entry."""
        return id(self._model), modality, self._index.modality

    def query(self, modality: str, value: str | Path, k: int = 10) -> list[Hit]:
        """The top-k hits for one query: a caption (modality "text") or a file path ("image", "audio")."""
        return self.search(self.embed(modality, value), k)[0]

    def query_latents(self, modality: str, latents: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The top-k hits of each row of stage-1 `latents` (N, D_modality) of a query modality."""
        self._check_source(modality)
        return self.search(self._embed(modality, latents=latents), k)

    def embed(self, modality: str, value: str | Path) -> np.ndarray:
        """(1, dim) float32: the query embedding `query` searches with."""
        return self.embed_many(modality, [value])

    def embed_many(self, modality: str, values: list[str | Path]) -> np.ndarray:
        """(B, dim) float32: the query embeddings of captions or files, in one model call."""
        self._check_source(modality)
        return self._embed(modality, inputs=[self._checked_value(modality, v) for v in values])

    def search(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The top-k hits of each query embedding (Q, dim); k larger than the gallery gives all of it."""
        return self._index.search(queries, min(k, self.size))

    def _checked_value(self, modality: str, value: str | Path) -> str:
        if modality in FILE_MODALITIES:
            path = Path(value)
            if not path.is_file():
                raise SearchError(f"{modality} query {path} is not a file")
            return str(path)
        if not isinstance(value, str) or is_blank(value):
            raise SearchError(f"a {modality} query must be a non-empty string (with something visible)")
        return value

    def _embed(self, modality: str, inputs: list[str] | None = None, latents: Any = None) -> np.ndarray:
        # M3Model.embed_query holds the model's lock
        return self._model.embed_query(inputs, source=modality, target=self._index.modality, latents=latents)

    def _check_source(self, modality: str) -> None:
        if modality not in self.sources:
            raise SearchError(f"the model was not trained for {modality}->{self._index.modality}; its "
                              f"directions are {', '.join(self._model.directions)}")


def hits_table(hits: list[Hit], width: int = 48) -> str:
    """The hits as a text table: rank, score, row id, caption (cut to `width`), media path."""
    lines = [f"{'rank':>4}  {'score':>7}  {'row':>7}  {'caption':<{width}}  media"]
    for h in hits:
        caption = h.caption or "-"
        caption = caption if len(caption) <= width else caption[:width - 1] + "…"
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.row_id:>7}  {caption:<{width}}  {h.media or '-'}")
    return "\n".join(lines)
