"""runtime.matmul_precision: TF32 for float32 matmuls on a GPU (auto), exact on a CPU, refused where it
would do nothing, set once by the resolver and recorded with the run."""

from __future__ import annotations

import pytest
import torch

from m3jepa.config import ConfigError, RuntimeConfig
from m3jepa.core.device import resolve
from m3jepa.core.provenance import Session
from m3jepa.distributed import DistInfo


@pytest.fixture
def restore_precision():
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


def test_auto_is_exact_on_a_cpu_and_set_in_torch(restore_precision) -> None:
    torch.set_float32_matmul_precision("high")  # whatever was set before, the CPU run is exact
    runtime = resolve(RuntimeConfig(device="cpu"))
    assert runtime.matmul_precision == "highest"
    assert torch.get_float32_matmul_precision() == "highest"


def test_tf32_on_a_cpu_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match='runtime.matmul_precision = "high".*CPU'):
        resolve(RuntimeConfig(device="cpu", matmul_precision="high"))


@pytest.mark.parametrize(("asked", "got"), [("auto", "high"), ("high", "high"), ("highest", "highest")])
def test_a_gpu_takes_tf32_unless_told_otherwise(asked: str, got: str, restore_precision) -> None:
    before = torch.get_float32_matmul_precision()
    runtime = resolve(RuntimeConfig(device="cuda", matmul_precision=asked), DistInfo(),
                      cuda_available=True, cuda_count=1)
    assert (runtime.device.type, runtime.matmul_precision) == ("cuda", got)
    assert torch.get_float32_matmul_precision() == before  # a faked GPU changes no process-wide setting


def test_matmul_precision_values_are_checked() -> None:
    with pytest.raises(ConfigError, match="runtime.matmul_precision"):
        RuntimeConfig(matmul_precision="medium")


def test_provenance_records_the_precision_the_run_used(tmp_path, restore_precision) -> None:
    resolve(RuntimeConfig(device="cpu"))
    session = Session(tmp_path, 0).record["sessions"][-1]
    assert session["float32_matmul_precision"] == "highest"
