"""`m3jepa.load`: a trained predictor from a run or an export, and what it does with raw inputs or latents."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m3jepa.api.raw import ApiError, RawEncoders
from m3jepa.config import PipelineConfig
from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.device import Runtime
from m3jepa.core.directions import parse_direction, source_modalities
from m3jepa.core.objective import Objective, to_pred_space
from m3jepa.core.trained import ModelSource, open_trained
from m3jepa.knn import classify_by_nearest

log = logging.getLogger(__name__)

SPACES = ("cl", "pred")

Inputs = Sequence[str | Path] | Mapping[str, Sequence[str | Path]]
Latents = np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor]


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run `method` under the model's lock: one forward at a time, whichever thread or Searcher calls."""

    @functools.wraps(method)
    def locked(self: M3Model, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class M3Model:
    """A trained M3-JEPA predictor with the encoders its stores name, on one device.

    Two spaces, as `m3jepa evaluate` scores them: "cl" (the contrastive space: queries are the
    predictor's `cl_query` for a direction, targets its `encode_target`) and "pred" (queries are the
    predicted target latents, targets the stage-1 latents themselves). Every embedding is L2-normalised
    float32, one row per input. Inputs are raw (captions, image or audio paths, class names; the
    stage-1 encoder runs, imported lazily) or precomputed stage-1 latents.

    Thread-safe: every embedding runs under the model's one lock (`lock`; torch modules are not
    documented safe for concurrent forwards, and on a CPU one call at a time keeps torch's threads from
    fighting). Searchers and the server share it, so one lock guards one model.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        objective: Objective,
        runtime: Runtime,
        encoders: dict[str, dict[str, str]],
        vocabularies: dict[str, list[str]],
        source: ModelSource,
        tails: dict[str, Any] | None = None,
        vocabulary_latents: dict[str, np.ndarray] | None = None,
        query_encoder_precision: str = "fp32",
        weights_sha256: str | None = None,
    ) -> None:
        self.cfg = cfg
        # the sha256 of the weights as verified when loaded (None: not recorded): what indexes record
        self.weights_sha256 = weights_sha256
        self.objective = objective.eval()
        self.runtime = runtime
        self.encoders = encoders  # modality -> {"encoder": name, "revision": rev}
        self.vocabularies = vocabularies  # "label"/"answer" -> the trained list
        # "label"/"answer" -> (K, D_m) stage-1 latents of that list, as the train store holds them
        self.vocabulary_latents = vocabulary_latents or {}
        self.source = source
        self.tails = tails or {}
        self.lock = threading.RLock()  # reentrant: classify and answer call embed_query and embed_target
        self.raw = RawEncoders(encoders, runtime.device, cfg.encode.dtype, vocabularies, self.tails,
                               cfg.lora.layers if cfg.lora.enabled else None, query_encoder_precision)

    # ------------------------------------------------------------ what the model is

    @property
    def directions(self) -> list[str]:
        """The directions the predictor was trained for, e.g. ["image->text", "text->image"]."""
        return list(self.cfg.train.directions)

    @property
    def modalities(self) -> list[str]:
        """Every modality the predictor takes or targets, e.g. ["image", "text"]."""
        return sorted(self.objective.predictor.dims)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def query_encoder_precision(self) -> str:
        """"fp32", or "int8" when raw text queries go through MiniLM with int8 Linear layers (opt-in)."""
        return self.raw.query_precision

    def vocabulary(self, modality: str) -> list[str]:
        """The trained class list ("label") or candidate answers ("answer")."""
        if modality not in self.vocabularies:
            raise ApiError(f"this model has no {modality} vocabulary; it has "
                           f"{', '.join(sorted(self.vocabularies)) or 'none'}")
        return list(self.vocabularies[modality])

    def __repr__(self) -> str:
        int8 = ", query_encoder_precision=int8" if self.query_encoder_precision == "int8" else ""
        return (f"M3Model({self.source.kind} {self.source.path}, directions={self.directions}, "
                f"device={self.device}, precision={self.runtime.precision}{int8})")

    # ------------------------------------------------------------ embeddings

    @_serialised
    def encode(self, modality: str, inputs: Sequence[str | Path]) -> np.ndarray:
        """(N, D_m) float32 stage-1 latents of raw inputs, as a feature store of this model holds them."""
        return self.raw.encode(modality, inputs).cpu().numpy()

    @_serialised
    @torch.inference_mode()
    def embed_query(
        self,
        inputs: Inputs | None = None,
        *,
        source: str,
        target: str,
        latents: Latents | None = None,
        space: str = "cl",
    ) -> np.ndarray:
        """(N, d) queries of direction `source->target` (source may be "image+question"): raw `inputs`, or
        stage-1 `latents` (N, D_source); a concatenated source takes {modality: inputs or latents}."""
        direction = self._direction(source, target)
        src, tgt = parse_direction(direction)
        x = self._source_latents(src, inputs, latents, query=True)
        predictor = self.objective.predictor
        if space == "cl" and hasattr(predictor, "query"):  # the contrastive task alone (the search path)
            with self.runtime.autocast():
                return _normalised(predictor.query(src, x, tgt))
        with self.runtime.autocast():
            out = predictor(src, x, tgt)
        if space == "pred":
            if out.pred is None:
                raise ApiError("this predictor (linear) has no prediction head; use space='cl'")
            return _normalised(out.pred)
        _check_space(space)
        return _normalised(out.cl_query)

    @_serialised
    @torch.no_grad()
    def embed_target(
        self,
        inputs: Sequence[str | Path] | None = None,
        *,
        modality: str,
        latents: np.ndarray | torch.Tensor | None = None,
        space: str = "cl",
    ) -> np.ndarray:
        """(N, d) gallery rows of `modality` (what queries of any direction into it are scored against)."""
        _check_space(space)
        if modality not in {parse_direction(d)[1] for d in self.directions}:
            raise ApiError(f"no direction of this model targets {modality!r}; its directions are "
                           f"{', '.join(self.directions)}")
        y = self._latents(modality, inputs, latents)
        if space == "pred":  # the targets in the space the run predicts in (standardised, when it trained so)
            return _normalised(to_pred_space(self.objective.predictor, modality, y))
        with self.runtime.autocast():
            return _normalised(self.objective.predictor.encode_target(modality, y))

    # ------------------------------------------------------------ tasks

    def classify(
        self,
        inputs: Sequence[str | Path] | None = None,
        *,
        source: str = "image",
        latents: np.ndarray | torch.Tensor | None = None,
        labels: Sequence[str] | None = None,
    ) -> list[str]:
        """The nearest class of each input among `labels` (default: every trained class), in the
        headline space: a direction `source->label` scored as `m3jepa evaluate` scores it."""
        return self._nearest(source, "label", labels, inputs, latents)

    def answer(
        self,
        images: Sequence[str | Path] | None = None,
        questions: Sequence[str] | None = None,
        *,
        latents: Mapping[str, np.ndarray | torch.Tensor] | None = None,
        candidates: Sequence[str] | None = None,
    ) -> list[str]:
        """The answer to each (image, question) pair among `candidates` (default: every trained answer),
        through the direction image+question->answer."""
        inputs = None if latents is not None else {"image": images or [], "question": questions or []}
        if inputs is not None and len(inputs["image"]) != len(inputs["question"]):
            raise ApiError(f"{len(inputs['image'])} images but {len(inputs['question'])} questions; "
                           "give one question per image")
        return self._nearest("image+question", "answer", candidates, inputs, latents)

    def _nearest(
        self, source: str, target: str, among: Sequence[str] | None, inputs: Any, latents: Any
    ) -> list[str]:
        """The nearest of the trained `target` vocabulary (or its subset `among`) to each query."""
        vocab = self.vocabulary(target)
        chosen = list(among) if among is not None else vocab
        position = {v: i for i, v in enumerate(vocab)}
        unknown = [v for v in chosen if v not in position]
        if unknown or not chosen:
            raise ApiError(f"{unknown[:3] or 'nothing'}: choose among the trained {target}s "
                           f"({', '.join(vocab[:8])}{', ...' if len(vocab) > 8 else ''})")
        rows = self.vocabulary_latents[target][[position[v] for v in chosen]]  # (K, D_target)
        space = self.cfg.eval.headline if self.cfg.model.predictor != "linear" else "cl"
        queries = self.embed_query(inputs, source=source, target=target, latents=latents, space=space)
        gallery = self.embed_target(modality=target, latents=rows, space=space)
        return [chosen[i] for i in classify_by_nearest(queries, gallery)]

    # ------------------------------------------------------------ helpers

    def _direction(self, source: str, target: str) -> str:
        direction = f"{source}->{target}"
        if direction not in self.directions:
            raise ApiError(f"this model was not trained for {direction}; its directions are "
                           f"{', '.join(self.directions)}")
        return direction

    def _source_latents(self, src: str | tuple[str, ...], inputs: Any, latents: Any,
                        query: bool = False) -> Any:
        if isinstance(src, str):
            return self._latents(src, inputs, latents, query)
        parts = {}
        for m in source_modalities(src):
            given = None if latents is None else latents.get(m)
            raw = None if inputs is None else inputs.get(m)
            parts[m] = self._latents(m, raw, given, query)
        return parts

    def _latents(self, modality: str, inputs: Any, latents: Any, query: bool = False) -> torch.Tensor:
        """(N, D_m) float32 on the model's device, from raw inputs (of a query: `query`) or given latents."""
        if (inputs is None) == (latents is None):
            raise ApiError(f"give either {modality} inputs or {modality} latents, not both or neither")
        if inputs is not None:
            if isinstance(inputs, (str, Path)):
                raise ApiError(f"{modality} inputs must be a list, e.g. [{str(inputs)!r}]")
            return self.raw.encode(modality, list(inputs), query=query)
        t = torch.as_tensor(np.asarray(latents) if not torch.is_tensor(latents) else latents)
        want = self.objective.predictor.dims[modality]
        if t.ndim != 2 or t.shape[1] != want:
            raise ApiError(f"{modality} latents must be (N, {want}); got {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ApiError(f"{modality} latents hold NaN or infinite values")
        return t.to(self.device, torch.float32)


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ApiError(f"space={space!r} is not one of {', '.join(SPACES)}")


def _normalised(t: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(t.float(), dim=-1).cpu().numpy()  # (N, d) float32


# ---------------------------------------------------------------- load


def load(
    path: str | Path, checkpoint: str = "best", device: str = "auto", precision: str | None = None,
    query_encoder_precision: str = "fp32",
) -> M3Model:
    """A trained model from a run directory (its `checkpoint`: best | latest) or an `m3jepa export`
    folder, on `device` (auto | cpu | cuda | cuda:N) in `precision` (default: the run's).
    `query_encoder_precision="int8"` (CPU only, opt-in) embeds raw text queries with MiniLM's Linear
    layers in int8: ~2x faster, but no longer equal to the stored latents (docs/serve.md)."""
    try:
        trained = open_trained(Path(path), checkpoint)  # the one loader (m3jepa/core/trained.py)
        runtime = trained.runtime(device, precision)
        objective = trained.objective(runtime)
        names, latents = trained.vocabularies()
    except CheckpointError as e:
        raise ApiError(str(e)) from None
    tails = _tails(trained.cfg, trained.encoders, trained.adapters, runtime.device)
    return M3Model(trained.cfg, objective, runtime, trained.encoders, names, trained.source, tails, latents,
                   query_encoder_precision, trained.weights_sha256)


def _tails(cfg: PipelineConfig, encoders: dict[str, dict[str, str]], adapters: Path | None,
           device: torch.device) -> dict[str, Any]:
    """The LoRA run's tuned tails with their adapters (peft format), on `device`."""
    if not cfg.lora.enabled or adapters is None:
        return {}
    from m3jepa.encoders import get_encoder_spec
    from m3jepa.lora.tunable import tail_for

    tails = {}
    for folder in sorted(p for p in adapters.iterdir() if p.is_dir()):
        m = folder.name
        if m not in encoders:
            raise ApiError(f"{folder}: adapters for {m!r}, which the model does not take")
        tail = tail_for(get_encoder_spec(encoders[m]["encoder"]), m, cfg.lora, device)
        tail.load_adapters(folder)
        tails[m] = tail.eval()
    return tails
