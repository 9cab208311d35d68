"""`m3jepa evaluate`: rebuild the predictor from a checkpoint alone and score retrieval on a split."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m3jepa.core.checkpoint import CheckpointError
from m3jepa.core.device import CPU, Runtime
from m3jepa.core.directions import direction_modalities, parse_direction
from m3jepa.core.freshness import check_fresh
from m3jepa.core.layout import RunDir
from m3jepa.core.paired import PairedSplit, load_split
from m3jepa.core.runlock import RunLock, RunLockedError
from m3jepa.core.runstores import check_eval_stores
from m3jepa.core.trained import open_run
from m3jepa.eval.device_ranks import device_retrieval_metrics
from m3jepa.eval.embed import SPACES, DirectionEmbeddings, embed_direction, source_batch
from m3jepa.eval.report import run_provenance
from m3jepa.eval.retrieval import RetrievalResult, retrieval_metrics
from m3jepa.files import refused_writes
from m3jepa.knn import topk_search
from m3jepa.model.moe import routing_health, routing_summary, warn_unbalanced

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def direction_recalls(
    predictor: nn.Module,
    data: PairedSplit,
    directions: list[str],
    space: str,
    protocol: str = "multi",
    runtime: Runtime = CPU,
) -> dict[str, dict[str, float]]:
    """R@1/5/10 of each direction in one space (validation uses this with the headline space)."""
    out = {}
    for d in directions:
        emb = embed_direction(predictor, data, d, space, protocol, runtime=runtime)
        out[d] = score(emb, runtime).recalls
    return out


@torch.no_grad()
def prediction_health(
    predictor: nn.Module,
    data: PairedSplit,
    directions: list[str],
    runtime: Runtime = CPU,
    batch_size: int = 2048,
) -> dict[str, dict[str, Any]]:
    """R² of the predicted latents and each gate's routing, per direction, over the split's pairs.

    One forward of every pair's source. `r2`: 1 − SSE/SST over the pairs, in the space L_pred uses (the
    standardised targets when the run trained with loss.pred_target = "standardized"), SST about the
    split's own per-dimension target mean; absent for a predictor that predicts no latent. `routing`:
    {direction: {gate: routing_health}} from the forward's expert counts; absent without a router.
    """
    from m3jepa.core.objective import to_pred_space

    top_k = getattr(getattr(predictor, "mixer", None), "top_k", None)
    r2: dict[str, float] = {}
    routing: dict[str, dict[str, Any]] = {}
    for d in directions:
        src, tgt = parse_direction(d)
        rows_s, rows_t = data.pairs[d]
        n = len(rows_t)
        if n == 0:
            continue
        sse = total = sq = None
        counts: dict[str, torch.Tensor] = {}
        for i in range(0, n, batch_size):
            x = source_batch(data, src, rows_s[i : i + batch_size])  # (b, D_s) or {m: (b, D_m)}
            with runtime.autocast():
                out = predictor(src, x, tgt)
            for gate, c in out.expert_counts.items():
                counts[gate] = c if gate not in counts else counts[gate] + c  # (N,)
            if out.pred is None:
                continue
            t = to_pred_space(predictor, tgt, data.rows(tgt, rows_t[i : i + batch_size])).double()  # (b, D_t)
            e = (out.pred.double() - t).square().sum()  # ()
            s, s2 = t.sum(dim=0), t.square().sum(dim=0)  # (D_t,)
            sse, total, sq = (e, s, s2) if sse is None else (sse + e, total + s, sq + s2)
        if sse is not None:
            sst = (sq - total.square() / n).sum()  # ()
            r2[d] = float(1.0 - sse / sst)
        if top_k is not None and counts:
            host = torch.stack(list(counts.values())).tolist()  # (G, N)
            routing[d] = {g: routing_health(c, n, top_k) for g, c in zip(counts, host, strict=True)}
    return {"r2": r2, "routing": routing}


SHARE_NOTE = ("share: the fraction of the split's rows that use the expert; each row uses k experts, so the "
              "shares sum to k × 100%, and 100% means every row uses that expert")
R2_NOTE = ("R²: 1 − SSE/SST of the predicted latents against the target encoder's latents over the split, "
           "in the space L_pred trains; 1 is exact, 0 no better than predicting their mean, below 0 worse "
           "(docs/predictor.md, Routing health)")


def routing_brief(metrics: dict[str, Any]) -> str:
    """The printed report's lines on routing and prediction: one line of routing health, one of R²."""
    lines = []
    if metrics.get("routing"):
        lines.append("- " + routing_summary(metrics["routing"], f"{metrics['split']} split"))
    r2 = metrics.get("r2")
    if r2:
        lines.append("- R² of the predicted latents: " + ", ".join(f"{d} {v:.3f}" for d, v in r2.items())
                     + f" ({R2_NOTE})")
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def routing_lines(metrics: dict[str, Any]) -> str:
    """Markdown for metrics.md: routing health in one line, then each gate's routing on the evaluated split
    (normalised entropy, busiest expert, collapse) and R², with what the share and R² mean."""
    routing = metrics.get("routing")
    if not routing:
        return ""
    lines = [
        f"\n### Routing and prediction on the {metrics['split']} split\n",
        routing_summary(routing, f"{metrics['split']} split") + "\n",
        "| direction | gate | normalised entropy | collapse below | busiest expert (share of rows¹) "
        "| collapsed | R²² |",
        "|---|---|---:|---:|---|---|---:|",
    ]
    r2 = metrics.get("r2", {})
    for d, gates in routing.items():
        for gate, h in gates.items():
            top = max(h["share"], key=h["share"].get)
            r2_cell = f"{r2[d]:.3f}" if d in r2 else ""
            lines.append(
                f"| {d} | {gate} | {h['entropy']:.3f} | {h['threshold']:.3f} | {top} ({h['share'][top]:.0%}) "
                f"| {'yes' if h['collapsed'] else 'no'} | {r2_cell} |"
            )
    lines += ["", f"¹ {SHARE_NOTE}.", "", f"² {R2_NOTE}."]
    return "\n".join(lines) + "\n"


def score(emb: DirectionEmbeddings, runtime: Runtime, faiss_threshold: int = 20000) -> RetrievalResult:
    """Exact recall of one direction's embeddings: on a GPU as blocked products where the latents are
    (eval.device_ranks); on a CPU with the exact-rank engine or top-k search (eval.retrieval)."""
    if runtime.device.type != "cpu":
        return device_retrieval_metrics(
            emb.queries_t, emb.gallery_t, emb.query_groups, emb.gallery_groups, ks=KS
        )
    return retrieval_metrics(
        emb.queries, emb.gallery, emb.query_groups, emb.gallery_groups, ks=KS,
        faiss_threshold=faiss_threshold, fast_path=runtime.cpu_fast_path,
    )


@dataclass
class EvalMetrics:
    """The metrics of one evaluation, in the JSON shape `--json` prints."""

    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return self.data

    def table(self) -> str:
        from m3jepa.eval.report import metrics_table
        from m3jepa.eval.vqa import vqa_lines

        return (metrics_table(self.data) + _classification_tables(self.data) + vqa_lines(self.data)
                + routing_brief(self.data))


def _classification(directions: list[str], space: str, embeddings) -> dict[str, Any]:
    """Directions into the `label` modality are classifiers: accuracy and macro P/R/F1 by nearest class."""
    from m3jepa.eval.classification import classify_groups

    out = {}
    for d in directions:
        if parse_direction(d)[1] == "label":
            emb = embeddings[(d, space)]
            res = classify_groups(emb.queries, emb.gallery, emb.query_groups, emb.gallery_groups)
            out[d] = res.to_json()
    return out


def _vqa(predictor: nn.Module, data: PairedSplit, directions: list[str], space: str) -> dict[str, Any]:
    """Directions into the `answer` modality of a VQA split: VQA accuracy by nearest answer (eval/vqa.py)."""
    from m3jepa.eval.vqa import vqa_metrics

    return vqa_metrics(predictor, data, directions, space)


def _classification_tables(metrics: dict[str, Any]) -> str:
    from m3jepa.eval.classification import ClassificationResult, markdown_table

    parts = []
    for d, res in metrics.get("classification", {}).items():
        parts.append(f"\n### {d} classification ({metrics['headline_space']} space)\n\n")
        parts.append(markdown_table(ClassificationResult.from_json(res)))
    return "".join(parts)


def evaluate_run(
    run_dir: Path,
    split: str | None = None,
    protocol: str | None = None,
    checkpoint: str = "best",
    device: str | None = None,
    precision: str | None = None,
    root: str | None = None,
) -> EvalMetrics:
    """Score a run directory's checkpoint on `split`; writes metrics.json, metrics.md and plots.

    `device`/`precision` override the run's runtime section (a run trained on a GPU scores on a CPU host);
    `root` its encode.root (a folder dataset's folder, which names its stores: `evaluate --root`). It holds
    the run's lock while it reads and writes: a run still training (or being evaluated) is refused.
    A run folder it cannot write (read-only, or a full disk) is one line (m3jepa/files.py).
    """
    with refused_writes(Path(run_dir), fix="then evaluate again: it writes its metrics into the run"):
        try:
            lock = RunLock(Path(run_dir)).acquire() if RunDir.holds_run(run_dir) else None
        except RunLockedError as e:  # training, or another evaluate
            raise RunLockedError(e.run_dir, e.pid, "evaluate writes its metrics into the run: wait for it to "
                                 "finish (m3jepa.load and m3jepa export read a consistent snapshot of its "
                                 "checkpoints meanwhile)") from None
        try:
            return _evaluate_run(Path(run_dir), split, protocol, checkpoint, device, precision, root)
        finally:
            if lock is not None:
                lock.release()


def _evaluate_run(run_dir: Path, split: str | None, protocol: str | None, checkpoint: str,
                  device: str | None, precision: str | None, root: str | None) -> EvalMetrics:
    trained = open_run(run_dir, checkpoint, split, protocol, root)  # the one loader; verifies checksums
    # the run's device and precision unless the command line overrides them, checked as the config is
    runtime = trained.runtime(device, precision)
    cfg = trained.cfg  # validated options; the run's absolute store root
    split, protocol = cfg.eval.split, cfg.eval.protocol
    predictor = trained.objective(runtime).predictor
    check_eval_stores(run_dir, cfg, split)  # the stores the run recorded in stores.json, not re-encoded ones
    check_fresh(cfg, [split], direction_modalities(cfg.train.directions), "evaluate")  # nor edited captions
    data = load_split(cfg, split, cfg.train.directions, device=runtime.device)
    _check_stores(trained.encoders, data)
    tuned: list[str] = []
    ck_path = trained.checkpoint_dir
    if cfg.lora.enabled:  # the tuned modalities' latents come from their tails with the run's adapters
        data, tuned = _apply_lora(cfg, data, ck_path, runtime.device)

    directions: dict[str, dict[str, dict[str, float]]] = {}
    gallery: dict[str, dict[str, int]] = {}
    embeddings: dict[tuple[str, str], DirectionEmbeddings] = {}
    spaces = [s for s in SPACES if not (s == "pred" and cfg.model.predictor == "linear")]
    for d in cfg.train.directions:
        directions[d] = {}
        for space in spaces:
            emb = embed_direction(predictor, data, d, space, protocol, runtime=runtime)
            res = score(emb, runtime, cfg.eval.faiss_threshold)
            directions[d][space] = res.recalls
            embeddings[(d, space)] = emb
            gallery[d] = {"queries": res.n_queries, "gallery": res.n_gallery}
    headline = cfg.eval.headline if cfg.eval.headline in spaces else "cl"
    metrics = {
        "split": split,
        "protocol": protocol,
        "checkpoint": checkpoint,
        "step": trained.state.step,
        "headline_space": headline,
        # `directions` holds the headline space's recalls; `spaces` both spaces of every direction.
        "directions": {d: directions[d][headline] for d in directions},
        "spaces": directions,
        "gallery": gallery,
        "latency_ms": _latency_ms(predictor, data, cfg.train.directions[0], headline, embeddings),
        # dataset, seed, config hash, stores, the code and times of training, and when this ran
        "provenance": run_provenance(run_dir),
    }
    if tuned:
        metrics["lora"] = {"modalities": tuned, "adapters": str(trained.adapters)}
    classification = _classification(cfg.train.directions, headline, embeddings)
    if classification:
        metrics["classification"] = classification
    vqa = _vqa(predictor, data, cfg.train.directions, headline)
    if vqa:
        metrics["vqa"] = vqa
    health = prediction_health(predictor, data, cfg.train.directions, runtime=runtime)
    if health["r2"]:
        metrics["r2"] = health["r2"]  # 1 − SSE/SST of the predicted latents, in the space L_pred uses
    if health["routing"]:
        metrics["routing"] = health["routing"]  # each gate's expert shares and normalised entropy
        warn_unbalanced(health["routing"], cfg.model.load_balance_weight, f"{split} split")
    _write_outputs(run_dir, metrics, embeddings, data, cfg.train.directions, headline, split, protocol)
    return EvalMetrics(metrics)


def _apply_lora(
    cfg, data: PairedSplit, ck_path: Path, device: torch.device
) -> tuple[PairedSplit, list[str]]:
    """Rebuild the run's LoRA tails on `device`, load its adapters (peft format), and re-encode the tuned
    modalities there."""
    from m3jepa.lora.objective import lora_from_checkpoint, row_sources, tuned_split

    tails = lora_from_checkpoint(cfg, data, ck_path, device)
    return tuned_split(data, tails, row_sources(cfg, data, tails)), sorted(tails)


def _check_stores(trained: dict[str, dict[str, str]], data: PairedSplit) -> None:
    """Refuse to score a predictor on features from another encoder or encoder revision."""
    for modality, feats in data.modalities.items():
        want = trained.get(modality)
        if want and (want["encoder"], want["revision"]) != (feats.encoder, feats.revision):
            raise CheckpointError(
                f"the {modality} store {feats.store} holds {feats.encoder}@{feats.revision}, "
                f"but the predictor was trained on {want['encoder']}@{want['revision']}; "
                "re-encode with the training encoder"
            )


@torch.no_grad()
def _latency_ms(
    predictor: nn.Module,
    data: PairedSplit,
    direction: str,
    space: str,
    embeddings: dict[tuple[str, str], DirectionEmbeddings],
    repeats: int = 50,
) -> float:
    """Median ms for one query: predictor forward on one row plus exact top-10 search of the gallery."""
    src, tgt = parse_direction(direction)
    emb = embeddings[(direction, space)]
    times = []
    for i in range(repeats):
        rows = emb.query_rows[i % len(emb.query_rows)][None]  # (1,) or (1, S)
        t0 = time.perf_counter()
        out = predictor(src, source_batch(data, src, rows), tgt)
        q = torch.nn.functional.normalize((out.pred if space == "pred" else out.cl_query).float(), dim=-1)
        # One query never pays for building a faiss index: the matmul path is the exact search here,
        # where the latents are (a GPU scores the gallery it holds; a CPU the host copy).
        if q.device.type == "cpu":
            topk_search(q.numpy(), emb.gallery, min(10, len(emb.gallery)), use_faiss=False)
        else:
            (q @ emb.gallery_t.T).topk(min(10, len(emb.gallery)), dim=1).indices.cpu()  # (1, 10), synced
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _write_outputs(run_dir, metrics, embeddings, data, directions, headline, split, protocol) -> None:
    from m3jepa.eval.plots import plot_similarity_matrix, plot_training_curves
    from m3jepa.eval.report import write_metrics

    layout = RunDir(run_dir)
    files = write_metrics(run_dir, metrics, stem=layout.metrics_stem(split, protocol))
    from m3jepa.eval.vqa import vqa_lines

    extra = _classification_tables(metrics) + vqa_lines(metrics) + routing_lines(metrics)
    if extra:
        files.markdown.write_text(files.markdown.read_text() + extra)
    if layout.metrics_log.exists():
        plot_training_curves(layout.metrics_log, layout.training_curves)
        from m3jepa.eval.plot_routing import plot_routing

        plot_routing(layout.metrics_log, layout.routing_plot)  # nothing without routed records
    image_text = "image->text" if "image->text" in directions else directions[0]
    emb = embeddings[(image_text, headline)]
    sim, rows, cols, pairs = _similarity_10x10(emb, data, image_text)
    if len(rows) >= 2:
        src, tgt = image_text.split("->")
        plot_similarity_matrix(sim, rows, cols, layout.similarity_plot(split),
                               title=f"{image_text} similarity", space=headline,
                               axis_names=(f"query ({src})", f"gallery ({tgt})"), true_pairs=pairs)


def _similarity_10x10(emb: DirectionEmbeddings, data: PairedSplit, direction: str):
    """The first 10 queries against the first gallery row of each of their groups (paper appendix), and
    the (row, column) cells where query and gallery item share a group (the true pairs)."""
    src, tgt = parse_direction(direction)
    first_of_group: dict[Any, int] = {}
    for i, g in enumerate(emb.gallery_groups):
        first_of_group.setdefault(g, i)
    q_idx = [i for i, g in enumerate(emb.query_groups) if g in first_of_group][:10]
    g_idx = [first_of_group[emb.query_groups[i]] for i in q_idx]
    sim = emb.queries[q_idx] @ emb.gallery[g_idx].T  # (10, 10)
    if isinstance(src, str):
        labels = [_label(data, src, int(emb.query_rows[i])) for i in q_idx]
    else:  # a concatenated input is labelled by its last part (the question)
        labels = [_label(data, src[-1], int(emb.query_rows[i][-1])) for i in q_idx]
    cols = [_label(data, tgt, int(emb.gallery_rows[j])) for j in g_idx]
    pairs = [(a, b) for a, i in enumerate(q_idx) for b, j in enumerate(g_idx)
             if emb.query_groups[i] == emb.gallery_groups[j]]
    return sim, labels, cols, pairs


def _label(data: PairedSplit, modality: str, row: int) -> str:
    m = data.modalities[modality]
    text = m.texts[row] if m.texts[row] else str(m.group_ids[row]).rsplit("/", 1)[-1]
    return text if len(text) <= 28 else text[:27] + "…"
