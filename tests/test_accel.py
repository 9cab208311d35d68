"""The fence around m3jepa.accel: the private torch API it uses still behaves, and no other path uses any."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path
from types import CodeType, FrameType

import numpy as np
import pytest
import torch
from torch import nn

import m3jepa
from m3jepa.accel.search import int8
from m3jepa.config import LossConfig, ModelConfig, PipelineConfig
from m3jepa.core.device import Runtime
from m3jepa.core.objective import Objective
from m3jepa.train.optim import build_optimizer, optimizer_step

PACKAGE = Path(m3jepa.__file__).resolve().parent
ACCEL = PACKAGE / "accel"
CLIP = ACCEL / "clip.py"  # clipping folded into fused AdamW: the one piece of the fence on the default path
# Private torch API as it can appear in our source.
PRIVATE = re.compile(
    r"\bgrad_scale\b|_get_fused_kernels_supported_devices|\._version\b|ops\.onednn|_foreach_"
)


# ---------------------------------------------------------------- the private API the fast path uses


def test_fused_adamw_still_divides_gradients_by_grad_scale() -> None:
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(5, 3))
    with torch.no_grad():
        b.copy_(a)
    g = torch.randn(5, 3)
    opt_a = torch.optim.AdamW([a], lr=0.1, fused=True)
    opt_b = torch.optim.AdamW([b], lr=0.1, fused=True)
    for _ in range(3):  # the first Adam step is sign-like and would hide a missing scale
        a.grad, b.grad = g * 4.0, g.clone()
        opt_a.grad_scale = torch.tensor(4.0)
        opt_a.step()
        opt_b.step()
        g = g * 0.5 + 0.1
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (
        "torch's fused AdamW no longer divides the gradients by the optimizer's `grad_scale` attribute: "
        "accel.ShadowAdamW (m3jepa/accel/adamw.py, ShadowAdamW.step) and accel.clipped_step (m3jepa/accel/"
        "clip.py, every fused AdamW run) fold gradient clipping into it, so clipping is now wrong; pass the "
        "clip factor another way (or clip with clip_grad_norm_ in m3jepa/train/optim.py:optimizer_step)"
    )


def test_the_version_counter_still_moves_on_in_place_changes() -> None:
    lin = nn.Linear(4, 3)
    seen = [lin.weight._version]
    with torch.no_grad():
        lin.weight.mul_(2.0)
        seen.append(lin.weight._version)
        lin.weight.copy_(torch.ones(3, 4))
        seen.append(lin.weight._version)
    lin.load_state_dict({"weight": torch.zeros(3, 4), "bias": torch.zeros(3)})
    seen.append(lin.weight._version)
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False)), (
        f"Tensor._version no longer moves on every in-place change ({seen}): accel's bf16 weight shadows "
        "(m3jepa/accel/shadows.py) use it to tell a stale shadow, so a changed weight could be ignored"
    )


def test_the_foreach_ops_of_shadow_adamw_still_compute_what_it_needs() -> None:
    steps = [torch.tensor(3.0), torch.tensor(7.0)]
    torch._foreach_add_(steps, 1)
    assert [float(s) for s in steps] == [4.0, 8.0], "torch._foreach_add_ changed (m3jepa/accel/adamw.py)"
    torch._foreach_sub_(steps, 1)
    assert [float(s) for s in steps] == [3.0, 7.0], "torch._foreach_sub_ changed (m3jepa/accel/adamw.py)"
    src = [torch.randn(4, 3), torch.randn(5)]
    dst = [torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(5)]
    torch._foreach_copy_(dst, src)
    assert torch.equal(dst[0], src[0].to(torch.bfloat16)) and torch.equal(dst[1], src[1]), (
        "torch._foreach_copy_ no longer casts like Tensor.to (m3jepa/accel/shadows.py, adamw.py)"
    )
    norms = torch._foreach_norm(src)
    want = [s.norm() for s in src]
    assert all(torch.allclose(n, w) for n, w in zip(norms, want, strict=True)), (
        "torch._foreach_norm changed: the clip norm of accel.ShadowAdamW (m3jepa/accel/adamw.py) relies on it"
    )


def test_onednn_int8_product_is_still_there_and_exact() -> None:
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN: the int8 stage is off")
    for op in ("qlinear_prepack", "qlinear_pointwise"):
        assert hasattr(torch.ops.onednn, op), (
            f"torch.ops.onednn.{op} is gone: the int8 first stage of the exact-rank search "
            "(m3jepa/accel/search/int8.py) turns itself off; port it or drop it"
        )
    if not int8._cpu_has_int8_dot():
        pytest.skip("no AMX-int8 / AVX512-VNNI: oneDNN's int8 product may saturate here")
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (33, 300), generator=g, dtype=torch.int8)
    p = torch.randint(-127, 128, (21, 300), generator=g, dtype=torch.int8)
    q[0], p[0] = 127, -127  # a sum at -d·127²
    sx, sy = 0.02, np.linspace(1e-3, 3.0, 21).astype(np.float32)
    cols = int8.Quantized(p, sy, np.zeros(21), np.zeros(21))
    out = int8.Product(cols, 33)(q, sx).double()  # (33, 21)
    exact = (q.double() @ p.double().T) * sx * torch.from_numpy(sy.astype(np.float64))  # independent
    assert bool(((out - exact).abs() <= int8.OUT_UNIT * exact.abs()).all()), (
        "torch.ops.onednn.qlinear_pointwise no longer gives the scaled int8 product within 2^-7: the "
        "int8 stage's error bound (m3jepa/accel/search/int8.py) would not hold"
    )


# ---------------------------------------------------------------- the default path touches none of it


class _Recorder:
    """sys.setprofile hook: m3jepa code objects entered, and calls from m3jepa code into private torch ops."""

    def __init__(self) -> None:
        self.code: set[CodeType] = set()
        self.private_calls: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg) -> None:
        caller = frame if event == "c_call" else frame.f_back
        if caller is None or not caller.f_code.co_filename.startswith(str(PACKAGE)):
            if event == "call" and frame.f_code.co_filename.startswith(str(PACKAGE)):
                self.code.add(frame.f_code)  # entered from torch (a hook, autograd)
            return
        if event == "call":
            self.code.add(frame.f_code)
            if frame.f_code.co_filename.startswith(str(PACKAGE)):
                return
            name = frame.f_code.co_name
        elif event == "c_call":
            name = getattr(arg, "__name__", "")
        else:
            return
        if name.startswith(("_foreach_", "_fused_")) or name == "_get_fused_kernels_supported_devices":
            self.private_calls.add(name)

    def __enter__(self) -> _Recorder:
        threading.setprofile(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        threading.setprofile(None)


def _private_lines(code: set[CodeType]) -> list[str]:
    """file:line: text of every source line, in every m3jepa function that ran, that names private API."""
    hits = []
    for c in code:
        if c.co_name == "<module>" or not c.co_filename.startswith(str(PACKAGE)):
            continue  # a module's top level runs once, on import: not the path
        lines = Path(c.co_filename).read_text().splitlines()
        for n in sorted({ln for _, _, ln in c.co_lines() if ln}):
            if PRIVATE.search(lines[n - 1]):
                hits.append(f"{Path(c.co_filename).relative_to(PACKAGE)}:{n}: {lines[n - 1].strip()}")
    return sorted(set(hits))


def _train_steps(runtime: Runtime, bf16_autocast: bool) -> _Recorder:
    """build_optimizer + 2 steps of the loop's sequence (zero_grad, forward, backward, optimizer_step)."""
    cfg = PipelineConfig()
    cfg.model = ModelConfig(dim=16, hidden=24, num_experts=3, top_k=2, cl_dim=8, dropout=0.1)
    cfg.runtime.precision = runtime.precision
    torch.manual_seed(0)
    obj = Objective(cfg.model, LossConfig(), {"image": 24, "text": 40})
    image, text = torch.randn(8, 24), torch.randn(8, 40)
    with _Recorder() as rec:
        opt = build_optimizer(obj, cfg, runtime)
        for direction, x, y in [("image->text", image, text), ("text->image", text, image)]:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
                loss = obj(direction, x, y)
            loss.total.backward()
            optimizer_step(opt, obj, 1.0)
    assert rec.code, "the recorder saw nothing: the test would prove nothing"
    return rec


@pytest.mark.parametrize(
    ("runtime", "autocast"),
    [
        pytest.param(Runtime(torch.device("cpu"), "fp32"), False, id="cpu-fp32"),
        # A GPU run's code path (plain model under bf16 autocast, torch's AdamW), on the CPU's autocast.
        pytest.param(Runtime(torch.device("cuda"), "bf16"), True, id="cuda-bf16-code-path"),
    ],
)
def test_the_default_path_touches_no_private_torch_api(runtime: Runtime, autocast: bool) -> None:
    """The default path runs one piece of the fence, the clip folding of torch's fused AdamW
    (accel/clip.py, its `grad_scale` guarded above), and no other private torch API anywhere."""
    rec = _train_steps(runtime, autocast)
    ran_accel = sorted({c.co_filename for c in rec.code if c.co_filename.startswith(str(ACCEL))})
    assert ran_accel == [str(CLIP)], f"the default path ran other m3jepa.accel code: {ran_accel}"
    assert not rec.private_calls, f"m3jepa code called private torch ops: {sorted(rec.private_calls)}"
    hits = [h for h in _private_lines(rec.code) if not h.startswith("accel/clip.py:")]
    assert not hits, "private torch API in code the default path ran:\n" + "\n".join(hits)


def test_the_recorder_sees_the_fast_path_use_private_api() -> None:
    """The check above can fail: on the CPU fast path it finds accel's private API."""
    rec = _train_steps(Runtime(torch.device("cpu"), "bf16"), True)
    hits = _private_lines(rec.code)
    assert any("grad_scale" in h for h in hits) and any("._version" in h for h in hits), hits
    assert "_foreach_add_" in rec.private_calls
