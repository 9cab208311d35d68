"""The CPU fast path (bf16 on a CPU), clipping folded into fused AdamW, and all private torch API, fenced.

Everything here is a faster way to compute what the plain model and torch's AdamW compute (tests compare
each against its plain reference), and everything that uses private torch API or run-time compiled C
lives here:
- `install(objective)`: the predictor's nn.Linear/nn.Dropout become `Bf16Linear`/`Bf16Dropout` (same
  parameters and state_dict) and MoE expert groups are padded to oneDNN-friendly buckets.
- `ShadowAdamW`: fused AdamW that keeps bf16 weight shadows and folds clipping into the update.
- `clipped_step`: gradient clipping folded into torch's fused AdamW, on any device (the default optimizer
  step of fp32 runs and of GPU runs: the one piece of this package outside the CPU fast path).
- `native`: builds, caches and safely loads the C/C++ kernels; `search`: exact-rank retrieval kernels.
- `text`: the opt-in int8 MiniLM for text queries (close to, not equal to, float32; never on by default).
`m3jepa.train.optim.build_optimizer` is the one caller of `install`/`ShadowAdamW`, `optimizer_step` the one
caller of `clipped_step`; `m3jepa.api.raw` the one caller of `text`.
"""

from m3jepa.accel.adamw import ShadowAdamW
from m3jepa.accel.clip import clipped_step, folds_clipping
from m3jepa.accel.install import ROW_BUCKET, install, shadowable_weights

__all__ = ["ROW_BUCKET", "ShadowAdamW", "clipped_step", "folds_clipping", "install", "shadowable_weights"]
