"""bench/gpu.py runs end to end on a CPU with --quick, and refuses a full run there in one line."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Every figure the GPU run reports, as a path into the JSON; each must be a finite positive number.
POSITIVE = [
    "peak.bf16_tflops",
    "peak.fp32_tflops",
    "train.params",
    "train.gflop_per_sample",
    "train.projection.steps",
    "train.projection.seconds_20_epochs",
    "retrieval.ms_both.median",
    "retrieval.ms_t2i",
    "retrieval.ms_i2t",
    "stage1.dinov2.rows_per_s.median",
    "stage1.dinov2.params",
    "stage1.llama.rows_per_s.median",
    "stage1.llama.params",
    "seconds_total",
]
PER_BATCH = [
    "samples_per_s.fast.median",
    "samples_per_s.reference.median",
    "speedup.median",
    "mfu_bf16_measured_peak",
    "mfu_bf16_measured_peak_with_logits",
    "host_batch_order_ms",
    "step_ms.fast",
    "step_ms.reference",
    "fast_step.ops_per_step.total",
    "fast_step.ops_per_step.compute",
]
# measured on a CPU too; the datasheet MFU is not (a CPU has no entry in the table: None, never guessed)
TARGETS = ["speedup_at_target_batch", "seconds_20_epochs", "coco5k_both_ways_ms"]


def _get(record: dict, path: str):
    for key in path.split("."):
        record = record[key]
    return record


def _positive(record: dict, path: str) -> None:
    value = _get(record, path)
    assert isinstance(value, int | float) and not isinstance(value, bool), f"{path} = {value!r}"
    assert math.isfinite(value) and value > 0, f"{path} = {value!r}"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_quick_run_on_cpu_reports_every_figure():
    # ~30 s on 2 quiet cores (most of it importing transformers and building the tiny models)
    proc = _run("--device", "cpu", "--quick", "--threads", "2", timeout=240)  # its parts stop at 90 s
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)  # stdout is the JSON alone; progress went to stderr
    assert "train: done" in proc.stderr and "done in" in proc.stderr
    assert record["errors"] == [] and record["quick"] is True and record["device_type"] == "cpu"
    assert record["torch"] and record["device"]
    for path in POSITIVE:
        _positive(record, path)
    results = record["train"]["results"]
    assert [r["batch"] for r in results] == [64, 256]
    for r in results:
        for path in PER_BATCH:
            _positive(r, path)
        assert r["losses_finite"] is True and r["rounds"] >= 1
        assert r["mfu_bf16_datasheet"] is None and r["reference_matmul_precision"] == "highest"
        # the GPU's code path, not the CPU fast path: plain model, grouped experts, torch's fused AdamW
        step = r["fast_step"]
        assert (step["expert_path"], step["optimizer"]) == ("grouped", "AdamW(fused)")
        assert step["syncs_per_step"] == {"dispatch_audit": 0.0, "cuda_sync_debug_mode": None}
        assert step["sync_ops"] == [] and step["kernels_per_step"] is None  # no profiler kernels on a CPU
        assert step["ops_per_step"]["compute"] < step["ops_per_step"]["total"]
    assert record["peak"]["datasheet_bf16_tflops"] is None
    assert record["train"]["projection"]["epochs"] == 20
    assert record["retrieval"]["exact"] is True
    for direction in ("t2i", "i2t"):
        check = record["retrieval"]["checks"][direction]
        assert check["ranks_equal"] and check["recalls_equal"]
    for key in TARGETS:
        t = record["targets"][key]
        _positive(t, "target")
        _positive(t, "measured")
        assert isinstance(t["met"], bool) and t["at_issue_shapes"] is False
    syncs = record["targets"]["syncs_per_step_at_target_batch"]
    mfu = record["targets"]["mfu_bf16_at_target_batch"]
    assert (syncs["target"], syncs["measured"], syncs["met"]) == (0.0, 0.0, True)
    assert mfu["measured"] is None and mfu["met"] is None


def test_full_run_on_cpu_is_refused_in_one_line():
    proc = _run("--device", "cpu", timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU benchmark" in lines[0], proc.stderr


def test_synthetic_coco_has_cocos_pairs_and_groups():
    import torch

    from bench import gpu

    images, captions = gpu.coco_groups(113_287, 566_747)
    assert len(images) == 113_287 and len(captions) == 566_747
    assert np.bincount(captions).min() == 5 and np.bincount(captions).max() == 6
    sh = gpu.QUICK
    data = gpu.coco_split(sh, torch.device("cpu"))
    rows_img, rows_txt = data.pairs["image->text"]
    assert data.num_pairs("image->text") == data.num_pairs("text->image") == sh.captions
    img_groups = data.modalities["image"].group_ids
    txt_groups = data.modalities["text"].group_ids
    assert (img_groups[rows_img] == txt_groups[rows_txt]).all()  # joined by group id


def test_batch_order_is_cached_per_epoch_and_read_only():
    from m3jepa.core.order import batch_indices, epoch_permutation

    first = batch_indices(4100, 512, 3, 0)
    assert batch_indices(4100, 512, 3, 1).base is first.base  # one permutation per epoch, not per step
    assert not first.flags.writeable  # shared by the epoch's steps: nobody may change it
    perm = np.random.default_rng([3, 1]).permutation(4100)  # epoch 1 drawn independently
    assert np.array_equal(batch_indices(4100, 512, 3, 8), perm[:512])
    assert np.array_equal(epoch_permutation(4100, 3, 1), perm)


def test_cpu_reference_ranks_break_ties_towards_the_lower_index():
    from bench import gpu

    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0 and 1 tie for the query below
    q = np.array([[1.0, 0.0]])
    assert gpu.cpu_reference_ranks(q, g, np.array([7]), np.array([3, 7, 7]))[0] == 1
    assert gpu.cpu_reference_ranks(q, g, np.array([7]), np.array([7, 3, 3]))[0] == 0


def test_datasheet_peaks_by_device_name():
    from bench import gpu_step

    expect = {"NVIDIA H100 80GB HBM3": 989.5, "NVIDIA H100 PCIe": 756.5, "NVIDIA H100 NVL": 835.5,
              "NVIDIA H200": 989.5, "NVIDIA H200 NVL": 835.5, "NVIDIA A100-SXM4-80GB": 312.0,
              "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L4": 121.0, "NVIDIA L40S": 366.5}
    for name, tflops in expect.items():
        sheet = gpu_step.datasheet_peak(name)
        assert sheet is not None and sheet.bf16_tflops == tflops, name
        assert sheet.source.startswith("https://www.nvidia.com/"), name
    assert gpu_step.datasheet_peak("NVIDIA GeForce RTX 4090") is None  # not in the table: no MFU guessed
    assert gpu_step.mfu(1000.0, 1e9, None) is None
    assert gpu_step.mfu(1000.0, 1e9, 2.0) == pytest.approx(0.5)


def test_account_counts_a_step_on_the_cpu():
    import torch

    from bench import gpu_step

    x = torch.ones(4, requires_grad=True)

    def step():
        (x * 2).sum().backward()

    counts = gpu_step.account(step, torch.device("cpu"), steps=2)
    assert counts["syncs_per_step"]["dispatch_audit"] == 0.0 and counts["kernels_per_step"] is None
    assert counts["ops_per_step"]["compute"] >= 2  # mul and sum forward, their backward

    def syncing():
        float(x.detach().sum())

    assert gpu_step.account(syncing, torch.device("cpu"), steps=2)["syncs_per_step"]["dispatch_audit"] == 1.0


@pytest.mark.slow
def test_the_compiled_contender_is_timed_beside_the_fast_step():
    # bench.gpu --compile: the fast step's twin through torch.compile (the plain path, as on a GPU), from the
    # same weights; on a CPU the profiler has no kernels to count, so those stay None, never made up
    from bench import gpu

    sh = dataclasses.replace(gpu.QUICK, rounds=1, fast_steps=1)
    device = torch.device("cpu")
    r = gpu.train_batch(sh, gpu.coco_split(sh, device), 64, {}, device, gpu.Budget(120.0), "default")
    step = r["compiled_step"]
    assert step["mode"] == "default" and r["losses_finite"] is True
    assert step["speedup_over_fast"]["median"] > 0 and step["ops_per_step"] is None
    assert step["kernels_per_step"] is None and step["mfu_bf16_datasheet"] is None
    assert set(r["samples_per_s"]) == {"fast", "reference", "compiled"}
