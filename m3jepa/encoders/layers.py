"""Layer stacks: split an encoder into a frozen prefix and its last n (LoRA-tunable) layers plus pooling."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m3jepa.encoders.base import EncodedBatch, EncoderError, EncoderSpec
from m3jepa.encoders.hub import cached_snapshot, offline_error, read_config
from m3jepa.encoders.pooling import masked_mean, unpad

log = logging.getLogger(__name__)

# EfficientNet-Lite0 at its 224 crop: output channels and grid side of the stem and of each of its 16
# blocks (measured on the packaged model; checked against a real prefix pass in tests/test_prefix.py)
LITE0_STEM = (32, 112)
LITE0_BLOCKS = (
    (16, 112), (24, 56), (24, 56), (40, 28), (40, 28), (80, 14), (80, 14), (80, 14),
    (112, 14), (112, 14), (112, 14), (192, 7), (192, 7), (192, 7), (192, 7), (320, 7),
)


@dataclass(frozen=True)
class StackGeometry:
    """Where an encoder is cut and what crosses the cut; what a prefix store's manifest records."""

    layer_index: int  # the first tunable layer (0-based); the prefix runs layers [0, layer_index)
    tunable_layers: int  # n: layers [layer_index, layer_index + n) are tunable
    state_dim: int  # width of one state row
    state_grid: tuple[int, int] | None = None  # (H, W) of a convnet's map, stored as H*W rows; else None


@dataclass
class PrefixStates:
    """The hidden states entering the first tunable layer, right-padded, with their mask."""

    states: torch.Tensor  # (B, T, D_state) float32
    mask: torch.Tensor  # (B, T) long, 1 on real positions

    def rows(self) -> list[torch.Tensor]:
        """One (T_i, D_state) tensor per row, padding removed: what a prefix store holds."""
        return unpad(self.states, self.mask)


def pad_states(rows: list[torch.Tensor]) -> PrefixStates:
    """Right-pad B tensors (T_i, D) into PrefixStates (B, T_max, D) with a (B, T_max) mask."""
    longest = max(r.shape[0] for r in rows)
    states = rows[0].new_zeros((len(rows), longest, rows[0].shape[1]))  # (B, T, D)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        states[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return PrefixStates(states, mask)


class LayerStack:
    """An encoder cut before its last n layers: prefix (frozen, no grad) | tunable layers + head + pooling.

    finish(prefix(x)) equals the encoder's own pooled output; finish keeps autograd on, so LoRA adapters
    on `tunable_modules()` train through it (stage 2).
    """

    NEEDS: tuple[str, ...] = ()  # the (dotted) attributes of the model this stack runs

    def __init__(self, encoder: Any, model: nn.Module, layers: nn.ModuleList, n_tunable: int):
        if not 1 <= n_tunable <= len(layers):
            raise EncoderError(
                f"{encoder.spec.name}: tunable_layers={n_tunable} must be in [1, {len(layers)}] (its depth)"
            )
        self.encoder = encoder
        self.model = model
        self.layers = layers
        self.n_tunable = n_tunable
        self.layer_index = len(layers) - n_tunable

    @property
    def geometry(self) -> StackGeometry:
        """The cut, as a prefix store's manifest records it (transformers: hidden_size wide rows)."""
        return StackGeometry(self.layer_index, self.n_tunable, int(self.model.config.hidden_size), None)

    # read from the last layer: in stage 2 only the tail is materialised, the front stays on "meta"
    @property
    def dtype(self) -> torch.dtype:
        return next(self.layers[-1].parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.layers[-1].parameters()).device

    def tunable_modules(self) -> nn.ModuleList:
        """The last n layers: the modules LoRA wraps."""
        return nn.ModuleList(self.layers[self.layer_index :])

    def head_modules(self) -> nn.ModuleList:
        """The frozen modules after the tunable layers (final norm, head conv); empty when there are none."""
        return nn.ModuleList()

    def weight_prefixes(self) -> list[str]:
        """state_dict key prefixes of `self.model` that `finish` needs: load just these in stage 2."""
        raise NotImplementedError

    def prefix(self, batch: dict[str, Any]) -> PrefixStates:
        """Run the frozen layers [0, layer_index) on one collated batch (no grad)."""
        raise NotImplementedError

    def finish(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Tunable layers, head and pooling on states (B, T, D_state), mask (B, T) → pooled (B, D) float32."""
        raise NotImplementedError


# ---------------------------------------------------------------- transformers stacks


class DinoV2Stack(LayerStack):
    """Dinov2Model: embeddings + encoder.layer[:L-n] | encoder.layer[L-n:] + layernorm + CLS."""

    NEEDS = ("embeddings", "encoder.layer", "layernorm")

    def __init__(self, encoder: Any, n_tunable: int):
        super().__init__(encoder, encoder.model, encoder.model.encoder.layer, n_tunable)

    def head_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.model.layernorm])

    def weight_prefixes(self) -> list[str]:
        return [f"encoder.layer.{i}." for i in range(self.layer_index, len(self.layers))] + ["layernorm."]

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor | None, layers: Any) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        # the model's own mask builder: None (no masking) when every position is real
        attn = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            hidden = layer(hidden, attn)  # (B, T, D)
        return hidden

    def prefix(self, batch: dict[str, Any]) -> PrefixStates:
        pixels = batch["pixel_values"].to(self.device, self.dtype)  # (B, 3, H, W)
        with torch.no_grad():
            hidden = self.model.embeddings(pixels)  # (B, 1 + P, D)
            hidden = self._run(hidden, None, self.layers[: self.layer_index])
        mask = torch.ones(hidden.shape[:2], dtype=torch.long)  # (B, 1 + P): images are never padded
        return PrefixStates(hidden.float().cpu(), mask)

    def finish(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = states.to(self.device, self.dtype)  # (B, T, D)
        hidden = self._run(hidden, mask.to(self.device), self.layers[self.layer_index :])
        return self.model.layernorm(hidden)[:, 0].float()  # (B, D): CLS after the final norm


class _TextStack(LayerStack):
    """Shared by text models: pool the encoder's layer mix by a masked mean (then L2 norm if it does)."""

    def _pool(self, outs: list[torch.Tensor], final: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # outs[-2] is the output of layer L-2 (the prefix state itself when n = 1); final is the
        # model's last hidden state: the encoder's "last2-mean" is their mean (HFTextEncoder.hidden)
        mix = final.float() if self.encoder.layers == "last" else (final.float() + outs[-2].float()) / 2
        pooled = masked_mean(mix, mask.to(mix.device))  # (B, D)
        if self.encoder.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return pooled

    def prefix(self, batch: dict[str, Any]) -> PrefixStates:
        ids = batch["input_ids"].to(self.device)  # (B, T)
        mask = batch["attention_mask"].to(self.device)  # (B, T)
        with torch.no_grad():
            hidden = self._embed(ids)  # (B, T, D)
            outs = self._run(hidden, mask, self.layers[: self.layer_index])
        return PrefixStates(outs[-1].float().cpu(), batch["attention_mask"].cpu().long())

    def finish(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(self.device).long()  # (B, T)
        outs = self._run(states.to(self.device, self.dtype), mask, self.layers[self.layer_index :])
        return self._pool(outs, self._final(outs[-1]), mask)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, layers: Any) -> list[torch.Tensor]:
        """[input, output of each layer], each (B, T, D)."""
        raise NotImplementedError

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class BertStack(_TextStack):
    """BertModel (MiniLM): embeddings + encoder.layer[:L-n] | encoder.layer[L-n:] + pooling."""

    NEEDS = ("embeddings", "encoder.layer")

    def __init__(self, encoder: Any, n_tunable: int):
        super().__init__(encoder, encoder.model, encoder.model.encoder.layer, n_tunable)

    def weight_prefixes(self) -> list[str]:
        return [f"encoder.layer.{i}." for i in range(self.layer_index, len(self.layers))]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids=ids)  # token types default to zeros, as in BertModel

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, layers: Any) -> list[torch.Tensor]:
        from transformers.masking_utils import create_bidirectional_mask

        attn = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask)
        outs = [hidden]
        for layer in layers:
            outs.append(layer(outs[-1], attn))  # (B, T, D)
        return outs


class DecoderStack(_TextStack):
    """Llama-family decoders: embed_tokens + layers[:L-n] | layers[L-n:] + norm + pooling.

    Each call rebuilds the causal + padding mask and the rotary embeddings with the model's own
    functions; positions are 0..T-1 (right padding), as in the model's forward, so a state computed in
    one padded batch is valid in any other.
    """

    NEEDS = ("embed_tokens", "layers", "rotary_emb", "norm")

    def __init__(self, encoder: Any, n_tunable: int):
        super().__init__(encoder, encoder.model, encoder.model.layers, n_tunable)

    def head_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.model.norm])

    def weight_prefixes(self) -> list[str]:
        return [f"layers.{i}." for i in range(self.layer_index, len(self.layers))] + ["norm."]

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def _run(self, hidden: torch.Tensor, mask: torch.Tensor, layers: Any) -> list[torch.Tensor]:
        from transformers.masking_utils import create_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
        attn = create_causal_mask(config=self.model.config, inputs_embeds=hidden, attention_mask=mask,
                                  past_key_values=None, position_ids=positions)
        rotary = self.model.rotary_emb(hidden, position_ids=positions)  # (cos, sin), each (1, T, head_dim)
        outs = [hidden]
        for layer in layers:
            outs.append(layer(outs[-1], attention_mask=attn, position_embeddings=rotary,
                              position_ids=positions))  # (B, T, D)
        return outs

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.norm(hidden)


# ---------------------------------------------------------------- EfficientNet-Lite0


class EfficientNetStack(LayerStack):
    """Lite0: stem + blocks[:16-n] | blocks[16-n:] + head conv/bn + global average.

    A state is the (C, H, W) map entering block 16-n, stored as H*W rows of C (row-major positions).
    """

    NEEDS = ("_blocks",)

    def __init__(self, encoder: Any, n_tunable: int):
        super().__init__(encoder, encoder.model, encoder.model._blocks, n_tunable)

    @property
    def geometry(self) -> StackGeometry:
        return efficientnet_geometry(self.n_tunable)

    def head_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.model._conv_head, self.model._bn1])

    def weight_prefixes(self) -> list[str]:
        return [f"_blocks.{i}." for i in range(self.layer_index, len(self.layers))] + ["_conv_head.", "_bn1."]

    def _blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        rate = self.model._global_params.drop_connect_rate
        for idx in range(start, stop):
            # the rate scaled by depth as extract_features does (inactive in eval mode)
            x = self.layers[idx](x, drop_connect_rate=rate * idx / len(self.layers) if rate else rate)
        return x

    def prefix(self, batch: dict[str, Any]) -> PrefixStates:
        pixels = batch["pixel_values"].to(self.device, torch.float32)  # (B, 3, 224, 224)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        m = self.model
        with torch.no_grad():
            x = m._swish(m._bn0(m._conv_stem(pixels)))  # (B, 32, 112, 112)
            x = self._blocks(x, 0, self.layer_index)  # (B, C, H, W)
        if tuple(x.shape[1:]) != (self.geometry.state_dim, *self.geometry.state_grid):
            raise EncoderError(f"{self.encoder.spec.name}: prefix map {tuple(x.shape[1:])} is not the "
                               f"expected {self.geometry}; inputs must be 224x224 crops")
        states = x.float().flatten(2).transpose(1, 2).contiguous().cpu()  # (B, H*W, C)
        return PrefixStates(states, torch.ones(states.shape[:2], dtype=torch.long))

    def finish(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # every row has all H*W positions, so the mask carries nothing (kept for the common signature)
        h, w = self.geometry.state_grid  # type: ignore[misc]
        b, t, c = states.shape
        if t != h * w:
            raise EncoderError(f"{self.encoder.spec.name}: {t} state rows, expected H*W = {h}*{w}")
        x = states.to(self.device, torch.float32).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        x = self._blocks(x.contiguous(memory_format=torch.channels_last), self.layer_index, len(self.layers))
        m = self.model
        return m._swish(m._bn1(m._conv_head(x))).float().mean(dim=(2, 3))  # (B, 1280)


def efficientnet_geometry(n_tunable: int) -> StackGeometry:
    """Where Lite0 is cut for n tunable blocks, from the constant block table (no weights loaded)."""
    if not 1 <= n_tunable <= len(LITE0_BLOCKS):
        raise EncoderError(
            f"efficientnet-lite0: tunable_layers={n_tunable} must be in [1, {len(LITE0_BLOCKS)}]"
        )
    index = len(LITE0_BLOCKS) - n_tunable
    channels, side = LITE0_BLOCKS[index - 1] if index else LITE0_STEM
    return StackGeometry(index, n_tunable, channels, (side, side))


# ---------------------------------------------------------------- entry points


# name → the layer stack of that family: the registry's entries name one (EncoderSpec.stack), and the
# same name is the encoder's LoRA target family (lora/tunable.py FAMILY_TARGETS)
STACKS: dict[str, type[LayerStack]] = {
    "efficientnet": EfficientNetStack,
    "dinov2": DinoV2Stack,
    "bert": BertStack,
    "llama": DecoderStack,
}
SUPPORTED = ("DINOv2, Llama-family decoders (embed_tokens/layers/rotary_emb/norm), BERT-like encoders and "
             "efficientnet-lite0")


def get_layer_stack(encoder: Any, n_tunable: int) -> LayerStack:
    """The layer stack of a loaded encoder (or of a meta-device shell of one, lora/tunable.py): the one its
    spec's registry entry names (EncoderSpec.stack), checked to fit the model it holds."""
    spec = encoder.spec
    if spec.stack is None:
        raise EncoderError(f"{spec.name}: no layer stack for this {spec.modality} encoder; --kind prefix and "
                           f"LoRA support {SUPPORTED}")
    cls = STACKS[spec.stack]
    missing = [a for a in cls.NEEDS if not _has(encoder.model, a)]
    if missing:
        raise EncoderError(f"{spec.name}: {type(encoder.model).__name__} has no {', '.join(missing)}, which "
                           f"a {spec.stack} layer stack needs (supported: {SUPPORTED})")
    return cls(encoder, n_tunable)


def _has(model: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(model, part):
            return False
        model = getattr(model, part)
    return True


def stack_geometry(spec: EncoderSpec, n_tunable: int) -> StackGeometry:
    """The geometry a prefix store of `spec` will have, from config.json alone (no weights loaded)."""
    if spec.stack == "efficientnet":
        return efficientnet_geometry(n_tunable)
    config = read_config(_model_dir(spec))
    depth, width = config.get("num_hidden_layers"), config.get("hidden_size")
    if not isinstance(depth, int) or not isinstance(width, int):
        raise EncoderError(f"{spec.name}: config.json lacks integer num_hidden_layers / hidden_size")
    if not 1 <= n_tunable <= depth:
        raise EncoderError(f"{spec.name}: tunable_layers={n_tunable} must be in [1, {depth}] (its depth)")
    return StackGeometry(depth - n_tunable, n_tunable, width, None)


def _model_dir(spec: EncoderSpec) -> Path:
    """The transformers model folder of an encoder with a layer stack (its config.json and weights)."""
    from m3jepa.encoders import registry

    name = spec.name
    if spec.stack is None:
        raise EncoderError(f"{name}: no layer stack for this {spec.modality} encoder; --kind prefix and LoRA "
                           f"support {SUPPORTED}")
    if name == "minilm-l6":
        from m3jepa.encoders import minilm

        return minilm.model_dir()
    presets = {**registry.DINOV2, **registry.LMS}
    target = presets[name][0] if name in presets else name[len(registry.HF_PREFIX):]
    if not (name in presets or name.startswith(registry.HF_PREFIX)):
        raise EncoderError(f"{name}: no transformers model folder for its {spec.stack} layer stack")
    path = Path(target).expanduser()
    if path.is_dir():
        return path
    found = cached_snapshot(target)
    if found is None:
        raise offline_error(target)
    return found


class PrefixEncoder:
    """An encoder seen through its layer stack: encode(batch, 'prefix') gives states and pooled latents.

    pooled = finish(prefix) in float32, so a prefix store's features are what stage 2's untrained
    (zero-LoRA) stack computes from full-precision states.
    """

    def __init__(self, encoder: Any, n_tunable: int):
        self.spec = encoder.spec
        self.preprocessor = encoder.preprocessor
        self.stack = get_layer_stack(encoder, n_tunable)

    def encode(self, batch: dict[str, Any], kind: str) -> EncodedBatch:
        """Pooled (B, D) and tokens = B x (T_i, D_state) prefix states."""
        if kind != "prefix":
            raise EncoderError(f"PrefixEncoder encodes kind 'prefix', not {kind!r}")
        pre = self.stack.prefix(batch)
        with torch.no_grad():
            pooled = self.stack.finish(pre.states, pre.mask).cpu()  # (B, D)
        return EncodedBatch(pooled=pooled, tokens=pre.rows())
