"""Rendered outputs: the metrics table and files, training-curve and similarity-matrix PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from m3jepa.eval.plots import (
    plot_similarity_matrix,
    plot_training_curves,
    read_training_log,
    training_figure,
)
from m3jepa.eval.report import metrics_table, write_metrics

DIRECTIONS = ("image->text", "text->image")


def _metrics() -> dict:
    recalls = {
        "image->text": {"pred": [41.2, 70.1, 80.0], "cl": [40.0, 69.0, 79.5]},
        "text->image": {"pred": [30.2, 60.1, 72.0], "cl": [29.0, 59.0, 71.5]},
    }
    return {
        "split": "test",
        "protocol": "multi",
        "headline_space": "pred",
        "spaces": {
            d: {s: {"R@1": v[0], "R@10": v[2], "R@5": v[1]} for s, v in spaces.items()}
            for d, spaces in recalls.items()
        },
        "gallery": {
            "image->text": {"queries": 5000, "gallery": 25000},
            "text->image": {"queries": 25000, "gallery": 5000},
        },
        "latency_ms": np.float64(0.1234),
    }


def _row(table: str, direction: str, space: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
        if cells[:2] == [direction, space]:
            return cells[2:]
    raise AssertionError(f"no row {direction}/{space} in\n{table}")


def test_metrics_table_rows_columns_and_footer():
    table = metrics_table(_metrics())
    assert "| direction | space | R@1 | R@5 | R@10 | mean |" in table  # columns ordered by k
    assert _row(table, "image->text", "pred") == ["41.20", "70.10", "80.00", "63.77"]
    assert _row(table, "text->image", "cl") == ["29.00", "59.00", "71.50", "53.17"]
    assert "| **image->text** | **pred** |" in table  # the headline space stands out
    assert "mean R@1 (pred, over directions): 35.70" in table
    assert "5,000 queries × 25,000 gallery items" in table
    assert "query latency: 0.123 ms" in table


def test_metrics_table_rejects_malformed_dicts():
    with pytest.raises(ValueError, match="headline_space"):
        metrics_table({k: v for k, v in _metrics().items() if k != "headline_space"})
    bad = _metrics()
    del bad["spaces"]["text->image"]["cl"]["R@10"]
    with pytest.raises(ValueError, match="same recalls"):
        metrics_table(bad)


def test_write_metrics_json_sorted_and_markdown(tmp_path):
    files = write_metrics(tmp_path / "run", _metrics())
    text = files.json.read_text()
    loaded = json.loads(text)
    assert loaded["latency_ms"] == pytest.approx(0.1234)
    assert list(loaded) == sorted(loaded)
    assert text.index('"R@1"') < text.index('"R@10"') < text.index('"R@5"')  # sorted keys, nested too
    assert files.markdown.read_text() == metrics_table(_metrics())
    assert not list((tmp_path / "run").glob("*.tmp"))
    other = write_metrics(tmp_path / "run", _metrics(), stem="metrics-val-paired")
    assert other.json.name == "metrics-val-paired.json" and other.markdown.is_file()
    with pytest.raises(ValueError, match="stem"):
        write_metrics(tmp_path / "run", _metrics(), stem="../x")


# ---------------------------------------------------------------- plots


def _check_png(path, min_size=(300, 200)):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        image.load()  # a truncated file fails here
        # Not a blank canvas: something was drawn.
        assert len(np.unique(np.asarray(image.convert("L")))) > 10


def _training_lines(n_steps=40, with_val=True):
    lines = []
    for step in range(1, n_steps + 1):
        direction = DIRECTIONS[step % 2]
        loss_pred, loss_cl = 0.5 / step, 4.0 / np.sqrt(step)
        lines.append(
            {
                "step": step,
                "loss": 0.5 * (loss_pred + loss_cl),
                "loss_pred": loss_pred,
                "loss_cl": loss_cl,
                "lr": 3e-4,
                "direction": direction,
            }
        )
        if with_val and step % 10 == 0:
            val = {d: {"R@1": step + i, "R@5": step + 10.0} for i, d in enumerate(DIRECTIONS)}
            lines.append({"step": step, "val": val, "mean_r1": step + 0.5})
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def test_training_curves_full_log(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    log_path.write_text(_training_lines())
    history = plot_training_curves(log_path, tmp_path / "curves.png")
    _check_png(tmp_path / "curves.png", min_size=(800, 300))
    assert (history.n_train, history.n_val) == (40, 4)
    assert set(history.loss) == set(DIRECTIONS)
    assert history.val_r1["text->image"] == ([10, 20, 30, 40], [11.0, 21.0, 31.0, 41.0])
    assert history.mean_r1[1] == [10.5, 20.5, 30.5, 40.5]


def test_training_curves_partial_logs(tmp_path):
    # No validation yet, and a last line cut mid-write by a running trainer.
    log_path = tmp_path / "metrics.jsonl"
    log_path.write_text(_training_lines(n_steps=5, with_val=False) + '{"step": 6, "lo')
    history = plot_training_curves(log_path, tmp_path / "a.png")
    assert (history.n_train, history.n_val) == (5, 0)
    _check_png(tmp_path / "a.png")
    # Only validation lines (e.g. an evaluation-only log).
    log_path.write_text(json.dumps({"step": 10, "val": {"image->text": {"R@1": 3.0}}, "mean_r1": 3.0}))
    history = plot_training_curves(log_path, tmp_path / "b.png")
    assert (history.n_train, history.n_val) == (0, 1)
    _check_png(tmp_path / "b.png")


def test_training_curves_bad_input(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        plot_training_curves(empty, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(FileNotFoundError, match="train-predictor"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "x.png")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": \n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        read_training_log(broken)
    unrelated = tmp_path / "unrelated.jsonl"
    unrelated.write_text('{"event": "start"}\n')
    with pytest.raises(ValueError, match="no training"):
        read_training_log(unrelated)


def test_similarity_matrix_png(tmp_path):
    rng = np.random.default_rng(0)
    sim = 0.1 * rng.standard_normal((10, 10)) + 0.6 * np.eye(10)
    rows = [f"image_{i:03d}.jpg" for i in range(10)]
    cols = [f"a long caption number {i} describing a child's drawing of a house and a sun" for i in range(10)]
    out = tmp_path / "figs" / "sim.png"
    plot_similarity_matrix(sim, rows, cols, out)
    _check_png(out, min_size=(600, 600))


def test_similarity_matrix_bad_input(tmp_path):
    with pytest.raises(ValueError, match="10x10 but got 9 row"):
        plot_similarity_matrix(np.zeros((10, 10)), ["r"] * 9, ["c"] * 10, tmp_path / "s.png")
    with pytest.raises(ValueError, match="2-D"):
        plot_similarity_matrix(np.zeros(10), ["r"] * 10, ["c"] * 10, tmp_path / "s.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_similarity_matrix(np.full((2, 2), np.nan), ["a", "b"], ["c", "d"], tmp_path / "s.png")


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_loss_panel_draws_one_line_per_direction(tmp_path):
    # alternate AGD with an even log_every: every line's own step trained text->image, so each direction's
    # loss comes from loss_by_direction (its mean over the steps since the previous line)
    records = [{"step": s, "loss": 1.0 / s, "loss_pred": 0.1, "loss_cl": 2.0, "direction": "text->image",
                "loss_by_direction": {"image->text": 3.0 / s, "text->image": 2.0 / s}} for s in (10, 20, 30)]
    log_path = tmp_path / "metrics.jsonl"
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ax = training_figure(read_training_log(log_path)).axes[0]
    lines = _lines(ax)
    assert list(lines) == ["loss image->text", "loss text->image", "loss_cl", "loss_pred"]
    assert lines["loss image->text"] == ([10, 20, 30], [0.3, 0.15, 0.1])
    assert lines["loss text->image"] == ([10, 20, 30], [0.2, 0.1, 2.0 / 30])
    # a joint log written before loss_by_direction: one line, labelled as the sum it is
    joint = {"step": 5, "loss": 4.0, "direction": "image->text,text->image"}
    log_path.write_text(json.dumps(joint) + "\n" + json.dumps({**joint, "step": 10, "loss": 3.0}) + "\n")
    lines = _lines(training_figure(read_training_log(log_path)).axes[0])
    assert lines == {"loss image->text + text->image": ([5, 10], [4.0, 3.0])}


def test_a_one_point_curve_has_a_visible_marker(tmp_path):
    log_path = tmp_path / "metrics.jsonl"
    val = {"step": 10, "val": {"image->text": {"R@1": 3.0}, "text->image": {"R@1": 5.0}}, "mean_r1": 4.0}
    train = {"step": 10, "loss": 2.0, "direction": "image->text", "loss_by_direction": {"image->text": 2.0}}
    log_path.write_text(json.dumps(train) + "\n" + json.dumps(val) + "\n")
    loss_ax, val_ax = training_figure(read_training_log(log_path)).axes
    for ax in (loss_ax, val_ax):
        for line in ax.get_lines():
            assert len(line.get_xdata()) == 1
            assert line.get_marker() not in (None, "None", "", " ") and line.get_markersize() >= 3
    assert sorted(_lines(val_ax)) == ["image->text", "mean R@1", "text->image"]


def test_similarity_matrix_marks_true_pairs_and_names_its_space(tmp_path):
    sim = np.arange(9, dtype=float).reshape(3, 3)
    long_id = "x" * 50
    fig = plot_similarity_matrix(sim, ["a", "b", long_id], ["c", "d  e", "f"], tmp_path / "s.png",
                                 space="pred", axis_names=("query (image)", "gallery (text)"),
                                 true_pairs=[(0, 0), (2, 1)])
    ax = fig.axes[0]
    boxes = [(p.get_x(), p.get_y()) for p in ax.patches if p.get_gid() == "true pair"]
    assert boxes == [(-0.5, -0.5), (0.5, 1.5)]  # (column - 0.5, row - 0.5) of each true pair
    assert ax.get_title() == "image-text similarity, pred space (boxes: true pairs)"
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("query (image)", "gallery (text)")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "x" * 31 + "…"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["c", "d e", "f"]
    with pytest.raises(ValueError, match="outside the 3x3"):
        plot_similarity_matrix(sim, ["a"] * 3, ["c"] * 3, tmp_path / "s.png", true_pairs=[(3, 0)])
