"""`Searcher`: a model and an index it serves; embeds one query (caption or file) and searches."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from m3jepa.search.errors import SearchError
from m3jepa.search.identity import load_model, model_ref, sources_into
from m3jepa.search.index import Hit, SearchIndex

FILE_MODALITIES = ("image", "audio")  # their query value is a file path; "text" takes the caption itself


class Searcher:
    """Queries of any trained direction X->M against an index of gallery modality M.

    Thread-safe: the model's forward runs under a lock (torch modules are not documented safe for
    concurrent forwards); the faiss search runs outside it, concurrently."""

    def __init__(self, index: SearchIndex, model: Any):
        if index.modality is None:
            raise SearchError(f"{index.path} names no gallery modality (built from bare vectors); build it "
                              "with `m3jepa index`")
        self.index = index
        self.model = model
        self._lock = threading.Lock()
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

    @property
    def sources(self) -> list[str]:
        """The query modalities the model can use against this index, from its directions."""
        return sources_into(self.model.directions, self.index.modality)

    def query(self, modality: str, value: str | Path, k: int = 10) -> list[Hit]:
        """The top-k hits for one query: a caption (modality "text") or a file path ("image", "audio")."""
        self._check_source(modality)
        if modality in FILE_MODALITIES:
            path = Path(value)
            if not path.is_file():
                raise SearchError(f"{modality} query {path} is not a file")
            value = str(path)
        elif not isinstance(value, str) or not value.strip():
            raise SearchError(f"a {modality} query must be a non-empty string")
        return self.index.search(self._embed(modality, inputs=[value]), k)[0]

    def query_latents(self, modality: str, latents: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """The top-k hits of each row of stage-1 `latents` (N, D_modality) of a query modality."""
        self._check_source(modality)
        return self.index.search(self._embed(modality, latents=latents), k)

    def embed(self, modality: str, value: str | Path) -> np.ndarray:
        """(1, dim) float32: the query embedding `query` searches with."""
        self._check_source(modality)
        return self._embed(modality, inputs=[str(value)])

    def _embed(self, modality: str, inputs: list[str] | None = None, latents: Any = None) -> np.ndarray:
        with self._lock:
            return self.model.embed_query(inputs, source=modality, target=self.index.modality,
                                          latents=latents)

    def _check_source(self, modality: str) -> None:
        if modality not in self.sources:
            raise SearchError(f"the model was not trained for {modality}->{self.index.modality}; its "
                              f"directions are {', '.join(self.model.directions)}")


def hits_table(hits: list[Hit], width: int = 48) -> str:
    """The hits as a text table: rank, score, row id, caption (cut to `width`), media path."""
    lines = [f"{'rank':>4}  {'score':>7}  {'row':>7}  {'caption':<{width}}  media"]
    for h in hits:
        caption = h.caption or "-"
        caption = caption if len(caption) <= width else caption[:width - 1] + "…"
        lines.append(f"{h.rank:>4}  {h.score:>7.4f}  {h.row_id:>7}  {caption:<{width}}  {h.media or '-'}")
    return "\n".join(lines)
