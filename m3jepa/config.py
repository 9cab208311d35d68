"""Typed run configuration: dataclasses loaded from TOML pipelines with `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import sys
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

IMAGE_TEXT = ["image->text", "text->image"]


class ConfigError(ValueError):
    """A configuration that does not fit its schema; the message names the key and the fix."""


# ---------------------------------------------------------------- ceilings
# Every count-like setting has a ceiling, so a slip (encode.workers = 100000) is one line instead of a fork
# storm or an allocation failing deep inside a stage. These are the same on every machine, so a saved
# run's config loads anywhere; `check_machine` adds what this machine's cores allow where work starts.
MAX_SEED = 2**32 - 1  # numpy, torch and most tools take seeds in [0, 2^32)
MAX_STEPS = 10**9  # train.max_steps, the step intervals and patience: 11 days at 1 ms a step
MAX_EPOCHS = 10**6
MAX_TRAIN_BATCH = 2**20  # train.batch_size (the split's pairs bound it again when training starts)
MAX_ENCODE_BATCH = 2**16  # encode.batch_size: 65,536 images at 224 px are 39 GB of float32 pixels
MAX_SHARD_ROWS = 2**20  # encode.shard_size: a shard is held in memory until it is written
MAX_LAYERS = 1024  # encode.tunable_layers, lora.layers: the deepest encoders have about 100
MAX_EXPERTS = 1024  # model.num_experts: each expert is a module (the paper has 12)
MAX_WIDTH = 2**20  # model.dim / hidden / cl_dim, lora.r, and a store's or an export's latent dims
MAX_PARALLEL = 4096  # encode.workers / threads, train.num_threads: never more, whatever the machine
PARALLEL_PER_CPU = 4  # ... and at most 4 per logical CPU of the machine that runs the work (check_machine)


_PER_CPU = f"and at most {PARALLEL_PER_CPU} per logical CPU of the machine that runs the work"


def cpu_count() -> int:
    """The machine's logical CPUs (os.cpu_count; 1 when unknown)."""
    return os.cpu_count() or 1


def check_machine(cfg: PipelineConfig | EncodeConfig) -> None:
    """ConfigError for a parallelism setting beyond PARALLEL_PER_CPU per logical CPU of this machine.

    Called where the work starts (encode, train), not when a config is read: a run's saved config must
    still load on a smaller machine. More processes or threads than this only wait for each other, and
    `encode.workers = 100000` forks until the machine stops answering.
    """
    ceiling = PARALLEL_PER_CPU * cpu_count()
    why = f"{PARALLEL_PER_CPU} per logical CPU; this machine has {cpu_count()}"
    enc = cfg if isinstance(cfg, EncodeConfig) else None
    settings = (
        {"encode.workers": enc.workers, "encode.threads": enc.threads} if enc is not None
        else {"train.num_threads": cfg.train.num_threads}  # type: ignore[union-attr]
    )
    for key, value in settings.items():
        if value is not None and value > ceiling:
            raise ConfigError(f"{key}={value:,} is over this machine's ceiling of {ceiling} ({why}); "
                              f"set {key} <= {ceiling}")


@dataclass
class EncodeConfig:
    """Stage 1: which dataset, splits, modalities and encoders to turn into feature stores."""

    dataset: str = "tuxpaint"
    root: str | None = None  # None: the dataset's default root
    # ["all"]: every split of the dataset / every modality it has that an encoder exists for (by default
    # or named below), so `m3jepa encode --dataset asterisk` encodes its audio and text
    splits: list[str] = field(default_factory=lambda: ["all"])
    modalities: list[str] = field(default_factory=lambda: ["all"])
    image_encoder: str | None = None  # None: the dataset's default
    text_encoder: str | None = None
    audio_encoder: str | None = None
    label_encoder: str | None = None  # "onehot" for class labels as a modality
    # A folder, or an fsspec URL (s3://bucket/prefix, gs://..., memory://...) whose credentials and endpoint
    # come from the backend's environment (AWS_*, ~/.aws), never from the URL (docs/feature-store.md)
    store_root: str = "stores"
    # A local folder keeping whole copies of the remote shard files read (fsspec's filecache), so the
    # store feed and repeated runs read a bucket once; None: no cache. Only for a store_root at a URL.
    store_cache: str | None = None
    format: str = "zarr"  # zarr | hdf5
    kind: str = "pooled"  # pooled | tokens | prefix (states entering the last tunable_layers; docs/lora.md)
    tunable_layers: int = 3  # kind = prefix: how many final encoder layers stage 2 runs (and may LoRA-tune)
    dtype: str = "float16"  # float16 | float32
    batch_size: int = 64
    workers: int = 2
    # auto | low | normal: the decoding workers' CPU priority. auto: low when the encoder runs on the
    # CPU, so decoding fills the gaps of the forward pass instead of stalling its threads (docs/encode.md)
    decode_priority: str = "auto"
    device: str = "auto"  # auto | cpu | cuda
    shard_size: int = 2048
    skip_bad: bool = False
    limit: int | None = None  # keep the first N groups of each split (subsets for tests and smoke runs)
    seed: int = 0  # the dataset split seed
    threads: int | None = None  # torch threads per process (float results depend on it); None: default
    # How a media row's file is fingerprinted for staleness (docs/encode.md): "stat" (size and mtime, no
    # read) or "sha256" (its bytes: survives copies that change mtimes, costs a read of every file).
    content_hash: str = "stat"
    force: bool = False  # re-encode the requested stores from scratch, even cached or stale ones
    # dataset = "webdataset" only (img2dataset's tar shards; docs/datasets.md). caption_field: take each
    # caption from this field of the sample's .json instead of its .txt. split_field: the .json field that
    # names each sample's split. train/val/test_shards: each split's own shards (a brace pattern, a folder
    # or a URL; relative to encode.root). With none of the split keys, a seeded hash of the key splits.
    caption_field: str | None = None
    split_field: str | None = None
    train_shards: str | None = None
    val_shards: str | None = None
    test_shards: str | None = None

    def dataset_options(self) -> dict[str, str]:
        """The dataset's own settings that are set (get_dataset's `options`)."""
        keys = ("caption_field", "split_field", "train_shards", "val_shards", "test_shards")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def __post_init__(self) -> None:
        _choice("encode.format", self.format, ("zarr", "hdf5"))
        _choice("encode.content_hash", self.content_hash, ("stat", "sha256"))
        _choice("encode.kind", self.kind, ("pooled", "tokens", "prefix"))
        _choice("encode.dtype", self.dtype, ("float16", "float32"))
        _choice("encode.device", self.device, ("auto", "cpu", "cuda"))
        _choice("encode.decode_priority", self.decode_priority, ("auto", "low", "normal"))
        _count("encode.tunable_layers", self.tunable_layers, 1, MAX_LAYERS, "the deepest encoders have ~100")
        _count("encode.batch_size", self.batch_size, 1, MAX_ENCODE_BATCH, "a batch is held in memory")
        _count("encode.shard_size", self.shard_size, 1, MAX_SHARD_ROWS, "a shard is held in memory")
        _count("encode.workers", self.workers, 0, MAX_PARALLEL, _PER_CPU, hint="0 decodes in this process")
        if self.threads is not None:
            _count("encode.threads", self.threads, 1, MAX_PARALLEL, _PER_CPU, hint="unset: torch's default")
        if self.limit is not None:
            _positive("encode.limit", self.limit, hint="leave it unset for every group")
        _count("encode.seed", self.seed, 0, MAX_SEED, "any seed in range splits as well as another")
        _check_store_root(self.store_root, self.store_cache)


@dataclass
class ModelConfig:
    """The predictor: the M3-JEPA multi-gate MoE, or the ablation/baseline connectors."""

    predictor: str = "moe"  # moe | mlp (paper's "no MoE" row) | linear (LiT/ShareLock-style baseline)
    dim: int = 512  # d, the common width inside the predictor
    hidden: int = 1024  # h, each expert's hidden width
    num_experts: int = 12  # N
    top_k: int = 4  # k
    dropout: float = 0.1
    gates: str = "multi"  # multi (paper: one gate per task) | shared (official release: one gate)
    # topk_softmax (paper: softmax over the k selected logits) | softmax_topk (official release:
    # softmax over all N, keep the k largest, no renormalisation)
    routing: str = "topk_softmax"
    cl_dim: int = 256  # d_cl, the contrastive space
    load_balance_weight: float = 0.0  # Switch load balancing N·Σ f_e·P_e, mean over the gates; paper: none
    router_z_loss_weight: float = 0.0  # ST-MoE router z-loss mean(logsumexp(logits)²); the paper uses none

    def __post_init__(self) -> None:
        _choice("model.predictor", self.predictor, ("moe", "mlp", "linear"))
        _non_negative("model.load_balance_weight", self.load_balance_weight, hint="0 turns it off")
        _non_negative("model.router_z_loss_weight", self.router_z_loss_weight, hint="0 turns it off")
        _choice("model.gates", self.gates, ("multi", "shared"))
        _choice("model.routing", self.routing, ("topk_softmax", "softmax_topk"))
        for name in ("dim", "hidden", "cl_dim"):
            _count(f"model.{name}", getattr(self, name), 1, MAX_WIDTH, "the paper's widths are 512 to 2,048")
        _count("model.num_experts", self.num_experts, 1, MAX_EXPERTS, "the paper has 12")
        _positive("model.top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ConfigError(f"model.top_k={self.top_k} exceeds model.num_experts={self.num_experts}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        n = core_parameters(self)
        if n > MAX_PREDICTOR_PARAMETERS:
            raise ConfigError(
                f"model.dim={self.dim}, model.hidden={self.hidden} and model.num_experts={self.num_experts} "
                f"give at least {n:.3g} predictor parameters, over the limit of "
                f"{MAX_PREDICTOR_PARAMETERS:.0e} (160 GB of training state); make them smaller "
                "(the paper's predictor has 140.6M)"
            )


# Training holds >= 16 bytes per parameter (float32 weights, gradients and AdamW's two moments), so 1e10
# parameters need 160 GB: more than the largest single accelerator m3jepa runs on (H200, 141 GB) and more
# than its 128 GiB hosts. The paper's predictor (140.6M) is 70x below the limit.
MAX_PREDICTOR_PARAMETERS = 10**10


def core_parameters(model: ModelConfig) -> int:
    """A lower bound on the predictor's parameters: its mixer, gates and one contrastive head.

    The input and output projections are left out because they depend on the stores' dims.
    """
    if model.predictor == "linear":  # LinearAligner: latents straight into cl_dim; dim/hidden unused
        return 0
    expert = 2 * model.dim * model.hidden
    experts = expert * (model.num_experts if model.predictor == "moe" else 1)
    gates = 2 * model.dim * model.num_experts if model.predictor == "moe" else 0
    return experts + gates + model.dim * model.cl_dim


@dataclass
class LossConfig:
    """L = alpha * L_pred + (1 - alpha) * L_CL."""

    pred: str = "mse"  # mse (paper) | smooth_l1 (official release)
    alpha: float = 0.5
    temperature: float = 0.03  # the official release's fixed value; the initial value when learned
    # true: τ is learned (a log-τ parameter starting at `temperature`, clamped to [0.01, 1] = CLIP's logit
    # scale ≤ 100, no weight decay); CLIP's recipe is learn_temperature = true with temperature = 0.07
    learn_temperature: bool = False
    # the target L_pred and the "pred" space use: raw (paper: the encoder's latents) | standardized (each
    # dimension minus its train-split mean, over its train-split std; statistics kept in the checkpoint)
    pred_target: str = "raw"

    def __post_init__(self) -> None:
        _choice("loss.pred", self.pred, ("mse", "smooth_l1"))
        _choice("loss.pred_target", self.pred_target, ("raw", "standardized"))
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"loss.alpha={self.alpha} must be in [0, 1]")
        if not 0.01 <= self.temperature <= 1.0:  # CLIP's bounds: logit scale 1/τ in [1, 100]
            raise ConfigError(f"loss.temperature={self.temperature} must be in [0.01, 1], e.g. 0.03 or 0.07")


@dataclass
class TrainConfig:
    """Stage 2: AGD training of the predictor from feature stores."""

    directions: list[str] = field(default_factory=lambda: list(IMAGE_TEXT))
    schedule: str = "alternate"  # alternate | random | dynamic | joint
    direction_probs: list[float] | None = None  # for schedule = "random"
    train_split: str = "train"
    val_split: str = "val"
    epochs: int = 20
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.005
    warmup_frac: float = 0.1
    min_lr_frac: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50  # steps between validation recalls
    patience: int = 10  # evaluations without a better mean R@1 before stopping; 0 = never stop early
    checkpoint_every: int = 50
    log_every: int = 10
    num_threads: int | None = None
    # Where training batches come from: "memory" reads the train split's stores into RAM; "store" preads
    # each batch's rows on a read-ahead thread (bounded memory, same batches); "device" keeps the split
    # resident in GPU memory and indexes batches there; "auto" = device on a GPU when the split fits
    # its share of free GPU memory, else memory when the stores take under 25% of RAM, else store.
    # Validation always reads its split into memory.
    feed: str = "auto"  # auto | memory | store | device
    # TensorBoard scalars in <run>/tensorboard: "auto" when the tensorboard package is installed, "on"
    # (an error without it), "off". metrics.jsonl and metrics.csv are written either way.
    tensorboard: str = "auto"  # auto | on | off
    # Latent mixup (FuseMix): each step's batch is mixed with probability `mixup` (1: every batch, as
    # FuseMix; 0: off, the paper). Each pair i gets one λ_i ~ Beta(mixup_alpha, mixup_alpha) and a partner
    # π(i) (a permutation of the batch), the same in source and target (and in each part of a
    # concatenated input): x_i ← λ_i x_i + (1 − λ_i) x_π(i), y_i likewise, before the predictor.
    mixup: float = 0.0
    mixup_alpha: float = 1.0
    # A dataset whose `val_split` has no rows gets a validation split carved from the train split: this
    # share of the train groups (seeded by train.seed, whole groups, so no caption of a validation image
    # trains). 0 refuses such a dataset instead.
    carve_val: float = 0.1

    def __post_init__(self) -> None:
        _choice("train.schedule", self.schedule, ("alternate", "random", "dynamic", "joint"))
        _choice("train.feed", self.feed, ("auto", "memory", "store", "device"))
        _choice("train.tensorboard", self.tensorboard, ("auto", "on", "off"))
        if not 0.0 <= self.mixup <= 1.0:
            raise ConfigError(f"train.mixup={self.mixup} must be a probability in [0, 1] (0 off, 1 FuseMix)")
        if not (math.isfinite(self.mixup_alpha) and self.mixup_alpha > 0):
            raise ConfigError(f"train.mixup_alpha={self.mixup_alpha} must be finite and > 0 (FuseMix: 1)")
        if not 0.0 <= self.carve_val < 1.0:
            raise ConfigError(f"train.carve_val={self.carve_val} must be in [0, 1) (0: refuse a missing val)")
        self._check_directions()
        self._check_probs()
        self._check_counts()
        self._check_rates()

    def _check_directions(self) -> None:
        if not self.directions:
            raise ConfigError("train.directions is empty; give at least one, e.g. ['image->text']")
        for d in self.directions:
            if "->" not in d:
                raise ConfigError(f"train.directions: {d!r} is not of the form 'source->target'")
        twice = sorted({d for d in self.directions if self.directions.count(d) > 1})
        if twice:  # a repeated direction would silently get twice the steps of the others
            raise ConfigError(f"train.directions lists {', '.join(twice)} more than once; list each once")

    def _check_counts(self) -> None:
        _count("train.epochs", self.epochs, 1, MAX_EPOCHS)
        _count("train.batch_size", self.batch_size, 1, MAX_TRAIN_BATCH, "the split's pairs bound it again")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            _count(f"train.{name}", getattr(self, name), 1, MAX_STEPS)
        if self.max_steps is not None:  # None: the epochs decide
            _count("train.max_steps", self.max_steps, 1, MAX_STEPS, hint="leave it unset for the default")
        if self.num_threads is not None:  # None: torch's default threads
            _count("train.num_threads", self.num_threads, 1, MAX_PARALLEL, _PER_CPU,
                   hint="leave train.num_threads unset for the default")
        _non_negative("train.patience", self.patience, hint="0 never stops early")
        _count("train.patience", self.patience, 0, MAX_STEPS)
        _count("train.seed", self.seed, 0, MAX_SEED, "any seed in range trains as well as another")

    def _check_rates(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr={self.lr} must be a finite number > 0, e.g. 3e-4")
        _non_negative("train.weight_decay", self.weight_decay)
        _non_negative("train.grad_clip", self.grad_clip, hint="0 turns clipping off")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ConfigError(f"train.warmup_frac={self.warmup_frac} must be in [0, 1)")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise ConfigError(f"train.min_lr_frac={self.min_lr_frac} must be in [0, 1]")

    def _check_probs(self) -> None:
        probs = self.direction_probs
        if probs is None:
            return
        if len(probs) != len(self.directions):
            raise ConfigError("train.direction_probs must have one probability per direction")
        if not all(math.isfinite(p) and p >= 0 for p in probs) or sum(probs) <= 0:
            raise ConfigError(f"train.direction_probs={probs} must be finite, >= 0 and not all 0")


@dataclass
class RuntimeConfig:
    """Where stages 2 and 3 and the LoRA mode run, and in which precision (docs/training.md, Devices).

    `device` is resolved once (m3jepa.core.device.resolve) together with the process-group backend and
    passed down; `precision` bf16 is bf16 autocast over float32 master weights on any device (on a CPU
    it also takes the CPU fast path, m3jepa.accel).
    """

    device: str = "auto"  # auto (cuda when one is visible, else cpu) | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16
    # float32 matmuls: auto (TF32 on a GPU, "high"; exact on a CPU, "highest") | highest | high (TF32: a GPU
    # only); torch.set_float32_matmul_precision where the runtime is resolved (m3jepa.core.precision)
    matmul_precision: str = "auto"
    # Under torchrun, the dtype the gradients' all-reduce sends: "none" their own (float32), "bf16" half
    # the bytes, "auto" the device table's choice for the device type (bf16 on GPUs, none on CPUs)
    grad_compression: str = "auto"  # auto | none | bf16
    # torch.compile of the training step's forward and backward (the objective: predictor and losses):
    # off | default | max-autotune | reduce-overhead (CUDA graphs: a GPU only). m3jepa.core.compiled
    compile: str = "off"

    def __post_init__(self) -> None:
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"runtime.device={self.device!r} is not one of auto, cpu, cuda, cuda:N")
        _choice("runtime.precision", self.precision, ("fp32", "bf16"))
        _choice("runtime.matmul_precision", self.matmul_precision, ("auto", "highest", "high"))
        _choice("runtime.grad_compression", self.grad_compression, ("auto", "none", "bf16"))
        _choice("runtime.compile", self.compile, ("off", "default", "max-autotune", "reduce-overhead"))


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


@dataclass
class EvalConfig:
    """Stage 3: how runs are scored."""

    split: str = "test"
    protocol: str = "multi"  # multi (standard multi-caption) | paired (1:1)
    faiss_threshold: int = 20000  # larger galleries (batches of >= 64 queries) use faiss IndexFlatIP
    headline: str = "cl"  # the space early stopping and the headline use: cl | pred (both are reported)

    def __post_init__(self) -> None:
        _choice("eval.protocol", self.protocol, ("multi", "paired"))
        _choice("eval.headline", self.headline, ("cl", "pred"))
        _count("eval.faiss_threshold", self.faiss_threshold, 0, 2**62, hint="0 always uses faiss")


@dataclass
class LoraConfig:
    """Stage 2 LoRA: adapters on the last encoder layers, trained with the predictor (docs/lora.md).

    Defaults are the official release's: the last 3 layers, r = 4, alpha = 16, dropout 0.1, on the
    attention query and value projections.
    """

    enabled: bool = False
    # N: tune the last N layers, run from the prefix stores of encode.kind = "prefix" with
    # encode.tunable_layers = N; "all": every layer, run from the raw data (the slow path)
    layers: int | str = 3
    r: int = 4
    alpha: float = 16.0
    dropout: float = 0.1
    # q | k | v | o (attention projections), pw (a convnet's pointwise convolutions), or module names
    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    # the modalities to tune; empty: every modality whose encoder has at least one of the targets
    modalities: list[str] = field(default_factory=list)
    # JEPA-style stop-gradient: L_pred's target latent is detached, so the target encoder cannot shrink
    # its latents to make the prediction easy; L_CL still trains both encoders
    stop_grad_target: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layers, str) and self.layers != "all":
            raise ConfigError(f"lora.layers={self.layers!r} must be a positive integer or \"all\"")
        if isinstance(self.layers, int):
            _count("lora.layers", self.layers, 1, MAX_LAYERS, "the deepest encoders have ~100")
        _count("lora.r", self.r, 1, MAX_WIDTH, "the official release uses 4")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ConfigError("lora.targets is empty; the default is ['q', 'v']")


@dataclass
class PipelineConfig:
    """A whole run: encode, train, evaluate."""

    name: str = "run"
    run_dir: str | None = None  # None: runs/<name>
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        lo, enc = self.lora, self.encode
        if not lo.enabled:
            return
        if self.runtime.compile != "off":
            raise ConfigError(
                f"runtime.compile={self.runtime.compile!r} compiles the predictor's objective, and the LoRA "
                'mode runs encoder layers inside it that it is not built for; set runtime.compile = "off" '
                "for a LoRA run"
            )
        if self.train.mixup > 0:
            raise ConfigError(
                "train.mixup mixes latents, but with lora.enabled the tuned modalities arrive as encoder "
                "states that their tails pool; set train.mixup = 0 for a LoRA run"
            )
        if lo.layers == "all":
            if enc.kind != "pooled":
                raise ConfigError(
                    f'lora.layers="all" runs every layer from the raw data and pairs rows through the '
                    f'pooled stores; set encode.kind="pooled" (got {enc.kind!r})'
                )
        elif enc.kind != "prefix" or enc.tunable_layers != lo.layers:
            raise ConfigError(
                f"lora.layers={lo.layers} trains from prefix stores of the last {lo.layers} layers: set "
                f'encode.kind="prefix" and encode.tunable_layers={lo.layers} '
                f"(got kind={enc.kind!r}, tunable_layers={enc.tunable_layers})"
            )


# scheme://user:secret@host/... or a ?query (a SAS token, a signature): refused before anything is written,
# so a secret in a URL can never reach a run's config.toml or stores.json (m3jepa.location checks the same).
_URL_SECRET = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://([^/]*@|[^?#]*[?#])")


def _check_store_root(root: str, cache: str | None) -> None:
    if _URL_SECRET.match(root):
        raise ConfigError(
            "encode.store_root: a store URL may not carry credentials, a query or a fragment (the value is "
            "not repeated here); give credentials through the backend's environment (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or ~/.aws/credentials for s3://); the endpoint through AWS_ENDPOINT_URL"
        )
    if cache is not None and "://" in cache:
        raise ConfigError(f"encode.store_cache={cache!r} must be a local folder, not a URL")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={_shown(value)} is not one of {', '.join(allowed)}")


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a hostile config may be huge or deep)."""
    return reprlib.repr(value)


def _positive(key: str, value: int, hint: str = "") -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be positive" + (f"; {hint}" if hint else ""))


def _count(key: str, value: int, lo: int, hi: int, why: str = "", *, hint: str = "") -> None:
    """A count-like setting: refused below `lo` (positive / >= 0; `hint` says what to set) and above its
    ceiling `hi` (`why` says why it is there)."""
    if value < lo:
        bound = "positive" if lo == 1 else f">= {lo}"
        raise ConfigError(f"{key}={value} must be {bound}" + (f"; {hint}" if hint else ""))
    if value > hi:
        raise ConfigError(f"{key}={value:,} is over its ceiling of {hi:,}" + (f" ({why})" if why else "")
                          + "; docs/training.md lists the ceilings")


def _non_negative(key: str, value: float, hint: str = "") -> None:
    # `not >=` also refuses NaN, which every comparison answers False
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"{key}={value} must be a finite number >= 0" + (f" ({hint})" if hint else ""))


# ---------------------------------------------------------------- generic loading

# Keys an older m3jepa read, with what to set instead (an old key is an error, never silently ignored).
MOVED_KEYS = {"train.bf16": 'set runtime.precision = "bf16" (or "fp32") instead of train.bf16'}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config dict written by an older m3jepa (a checkpoint's config.toml), in today's keys."""
    out = _deep_copy(data)
    train = out.get("train", {})
    if isinstance(train, dict) and "bf16" in train:
        bf16 = train.pop("bf16")
        out.setdefault("runtime", {}).setdefault("precision", "bf16" if bf16 else "fp32")
    return out



def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a nested dict; unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        moved = MOVED_KEYS.get(f"{where}.{key}" if where else key)
        if moved:
            raise ConfigError(f"{where + '.' if where else ''}{key} has moved: {moved}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"known keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {_shown(value)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):  # `--set train.directions=image->text` is a one-item list
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_shown(value)}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, got {_shown(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key} must be a number, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {_shown(value)}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported config type {tp!r}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` → (['a', 'b'], value); the value is read as TOML, else kept as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r} must look like key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except (ValueError, RecursionError) as e:  # a number of over 4,300 digits; arrays nested too deep
        raise ConfigError(f"--set {key}: {_unreadable(e)}") from None
    return key.split("."), value


def _unreadable(e: BaseException) -> str:
    """Why TOML text that tomllib accepted cannot become values (too deep, or a number too long)."""
    if isinstance(e, RecursionError):
        return "its arrays or tables are nested deeper than Python's parser follows (about 1,000 levels)"
    if "digits" in str(e):
        return f"it holds a number of over {sys.get_int_max_str_digits():,} digits (no setting takes one)"
    return f"it cannot be read ({e})"


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; ConfigError naming the file for bytes that are not UTF-8, text that is not
    TOML, arrays nested too deep to parse and numbers too long to read."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path} cannot be read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start}); "
                          "save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: {_unreadable(e)}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of nested dict `data` with each `a.b=c` override set."""
    out = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        _set_key(out, path, value, f"--set {item!r}")
    return out


def _set_key(data: dict[str, Any], path: list[str], value: Any, what: str) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {part} is not a table")
    node[path[-1]] = value


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}


def load_pipeline(
    path: str | Path | None,
    overrides: list[str] | None = None,
    *,
    values: dict[str, Any] | None = None,
    written_by_m3jepa: bool = False,
) -> PipelineConfig:
    """Load a TOML pipeline (or the defaults when `path` is None) and apply `--set` overrides.

    `values`: dotted key -> value, set after the overrides as given (a command's own options, such as
    `--store-root`: a path is kept as it is, never read as TOML). `written_by_m3jepa`: the file is a run's
    or checkpoint's saved config, so keys an older m3jepa wrote are migrated (`migrate`) instead of refused.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pipeline file {path} does not exist")
        data = read_toml(path)
    try:
        if written_by_m3jepa:
            data = migrate(data)
        data = apply_overrides(data, overrides or [])
        for key, value in (values or {}).items():
            _set_key(data, key.split("."), value, key)
        return from_dict(PipelineConfig, data)
    except RecursionError:  # tables nested near Python's limit, which tomllib itself still read
        raise ConfigError(f"{path or 'the config'}: {_unreadable(RecursionError())}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as a plain nested dict, with None values dropped (TOML has no null)."""
    return _drop_none(dataclasses.asdict(cfg))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def dump_toml(cfg: Any) -> str:
    """The resolved config as TOML text (what a run directory and a checkpoint keep)."""
    return tomli_w.dumps(to_dict(cfg))


def save_toml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config to `path` atomically."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_toml(cfg))
    tmp.replace(path)
