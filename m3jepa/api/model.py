"""`m3jepa.load`: a trained predictor from a run or an export, and what it does with raw inputs or latents."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from m3jepa.api.raw import ApiError, RawEncoders
from m3jepa.config import PipelineConfig, RuntimeConfig, from_dict, migrate
from m3jepa.core.device import Runtime, resolve
from m3jepa.core.directions import parse_direction, source_modalities
from m3jepa.core.objective import Objective, to_pred_space

log = logging.getLogger(__name__)

EXPORT_FORMAT = "m3jepa-predictor"
EXPORT_VERSION = 1
SPACES = ("cl", "pred")
# modalities whose rows are a fixed vocabulary (classes, candidate answers): a model keeps the list
VOCABULARY_MODALITIES = ("label", "answer")
VOCABULARY_WEIGHTS = "vocabularies.safetensors"  # an export's (K, D_m) latents of each vocabulary

Inputs = Sequence[str | Path] | Mapping[str, Sequence[str | Path]]
Latents = np.ndarray | torch.Tensor | Mapping[str, np.ndarray | torch.Tensor]


@dataclass(frozen=True)
class ModelSource:
    """Where a model was loaded from: a run directory and checkpoint, or an export folder."""

    path: Path
    kind: str  # "run" | "export"
    checkpoint: str | None = None


class M3Model:
    """A trained M3-JEPA predictor with the encoders its stores name, on one device.

    Two spaces, as `m3jepa evaluate` scores them: "cl" (the contrastive space: queries are the
    predictor's `cl_query` for a direction, targets its `encode_target`) and "pred" (queries are the
    predicted target latents, targets the stage-1 latents themselves). Every embedding is L2-normalised
    float32, one row per input. Inputs are raw (captions, image or audio paths, class names; the
    stage-1 encoder runs, imported lazily) or precomputed stage-1 latents.
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
    ) -> None:
        self.cfg = cfg
        self.objective = objective.eval()
        self.runtime = runtime
        self.encoders = encoders  # modality -> {"encoder": name, "revision": rev}
        self.vocabularies = vocabularies  # "label"/"answer" -> the trained list
        # "label"/"answer" -> (K, D_m) stage-1 latents of that list, as the train store holds them
        self.vocabulary_latents = vocabulary_latents or {}
        self.source = source
        self.tails = tails or {}
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

    def encode(self, modality: str, inputs: Sequence[str | Path]) -> np.ndarray:
        """(N, D_m) float32 stage-1 latents of raw inputs, as a feature store of this model holds them."""
        return self.raw.encode(modality, inputs).cpu().numpy()

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
        from m3jepa.eval.classification import classify_by_nearest

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
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return _load_export(path, device, precision, query_encoder_precision)
    if (path / "checkpoints").is_dir():
        return _load_run(path, checkpoint, device, precision, query_encoder_precision)
    raise ApiError(f"{path} is neither a run directory (checkpoints/) nor an export (config.json + "
                   "model.safetensors); pass what `m3jepa train-predictor` or `m3jepa export` wrote")


def _runtime(cfg: PipelineConfig, device: str, precision: str | None) -> Runtime:
    return resolve(RuntimeConfig(device=device, precision=precision or cfg.runtime.precision))


def _objective(cfg: PipelineConfig, dims: dict[str, int], weights: dict[str, torch.Tensor],
               runtime: Runtime, where: Path) -> Objective:
    with runtime.device:
        objective = Objective(cfg.model, cfg.loss, dims)
    mine = {k: v for k, v in weights.items() if not k.startswith("encoders.")}  # adapters load via peft
    try:
        objective.load_state_dict(mine, strict=True)
    except RuntimeError as e:
        raise ApiError(f"{where}: the weights do not fit the model its config describes: {e}") from None
    return objective


def _load_run(run: Path, checkpoint: str, device: str, precision: str | None,
              query_encoder_precision: str = "fp32") -> M3Model:
    from m3jepa.core.checkpoint import load_checkpoint
    from m3jepa.core.runstores import eval_config

    if checkpoint not in ("best", "latest"):
        raise ApiError(f"checkpoint={checkpoint!r} is not one of best, latest")
    ck_path = run / "checkpoints" / checkpoint
    if not ck_path.is_dir():
        raise ApiError(f"{ck_path} does not exist; has {run} finished a validation?")
    ck = load_checkpoint(ck_path)  # verifies every file against checksums.json
    cfg = eval_config(run, ck.cfg, None, None)  # the run's absolute store root
    runtime = _runtime(cfg, device, precision)
    objective = _objective(cfg, ck.state.dims, ck.weights, runtime, ck_path)
    found = {m: run_vocabulary(cfg, m) for m in VOCABULARY_MODALITIES if m in ck.state.dims}
    tails = _tails(cfg, ck.state.stores, ck_path / "adapters", runtime.device)
    return M3Model(cfg, objective, runtime, dict(ck.state.stores), {m: v[0] for m, v in found.items()},
                   ModelSource(run, "run", checkpoint), tails, {m: v[1] for m, v in found.items()},
                   query_encoder_precision)


def run_vocabulary(cfg: PipelineConfig, modality: str) -> tuple[list[str], np.ndarray]:
    """(the group ids, i.e. class names or answers, of a vocabulary modality's train store in row order,
    their (K, D) stage-1 latents), valid rows only."""
    from m3jepa.core.paired import modality_store
    from m3jepa.store import open_store

    store = open_store(modality_store(cfg, cfg.train.train_split, modality))
    valid = np.asarray(store.rows.valid, dtype=bool)
    names = [g for g, ok in zip(store.rows.group_ids, valid, strict=True) if ok]
    return names, store.read(np.flatnonzero(valid))  # (K, D) float32


def _tails(cfg: PipelineConfig, encoders: dict[str, dict[str, str]], adapters: Path,
           device: torch.device) -> dict[str, Any]:
    """The LoRA run's tuned tails with their adapters (peft format), on `device`."""
    if not cfg.lora.enabled or not adapters.is_dir():
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


def _load_export(folder: Path, device: str, precision: str | None,
                 query_encoder_precision: str = "fp32") -> M3Model:
    meta = read_export_config(folder)
    cfg = from_dict(PipelineConfig, migrate(meta["pipeline"]))
    runtime = _runtime(cfg, device, precision)
    weights = load_file(str(folder / "model.safetensors"))
    objective = _objective(cfg, {m: int(d) for m, d in meta["dims"].items()}, weights, runtime, folder)
    encoders = {m: {"encoder": e["encoder"], "revision": e["revision"]} for m, e in meta["encoders"].items()}
    tails = _tails(cfg, encoders, folder / "adapters", runtime.device)
    vocab_latents = {}
    if (folder / VOCABULARY_WEIGHTS).is_file():
        vocab_latents = {m: t.numpy() for m, t in load_file(str(folder / VOCABULARY_WEIGHTS)).items()}
    return M3Model(cfg, objective, runtime, encoders, meta.get("vocabularies", {}),
                   ModelSource(folder, "export"), tails, vocab_latents, query_encoder_precision)


def read_export_config(folder: Path) -> dict[str, Any]:
    """config.json of an export, checked: the format, its version and the keys load needs."""
    try:
        meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ApiError(f"{folder / 'config.json'} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise ApiError(f"{folder / 'config.json'} is not an m3jepa export (format {EXPORT_FORMAT!r})")
    if meta.get("format_version") != EXPORT_VERSION:
        raise ApiError(f"{folder}: export format version {meta.get('format_version')!r}; this m3jepa "
                       f"reads version {EXPORT_VERSION}")
    missing = [k for k in ("pipeline", "dims", "encoders", "directions") if k not in meta]
    if missing:
        raise ApiError(f"{folder / 'config.json'} lacks {', '.join(missing)}")
    return meta
