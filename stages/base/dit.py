"""The Wan2.1 text-to-video diffusion transformer (DiT), weight-compatible with the public release.

Read top to bottom: the config and its named sizes, the small float32 layers, the time embedding and
3D rotary position embedding, the attention, the block, the head, the model, and loading of the
official and the diffusers checkpoint layouts.

Numerics follow Wan: the residual stream, the time embedding, the modulation (shift, scale, gate),
the layer norms and the output head run in float32; the linear layers of the attention and the
feed-forward network run in the dtype of their weights. So the same module runs with float32 or
bfloat16 weights, and `WanDiT.from_pretrained(..., dtype=torch.bfloat16)` keeps the few small
float32 parts (time embedding, modulation, cross-attention norm, head) in float32 as Wan does.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stages.attention import attention
from stages.base.teacache import TeaCache
from stages.parallel import SequenceParallel
from stages.weights import WeightsError, load_into, read_state_dict

ROPE_THETA = 10000.0
TIMESTEP_PERIOD = 10000.0  # the longest period of the sinusoidal timestep embedding


# --------------------------------------------------------------------------------------------------
# Config


@dataclass
class WanDiTConfig:
    """Sizes of a Wan DiT, named as in the official `config.json` (an omegaconf structured config)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    patch_size: List[int] = field(default_factory=lambda: [1, 2, 2])  # (time, height, width)
    in_dim: int = 16  # latent channels in
    out_dim: int = 16  # velocity channels out
    freq_dim: int = 256  # size of the sinusoidal timestep embedding
    text_dim: int = 4096  # size of the text encoder's features
    text_len: int = 512  # the text is zero-padded to this many tokens
    qk_norm: bool = True  # RMSNorm on queries and keys
    cross_attn_norm: bool = True  # LayerNorm (with affine) before the cross-attention
    eps: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        """Raises ValueError naming the first field that does not describe a buildable model."""
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim",
                     "text_dim", "text_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"WanDiTConfig.{name}={value!r} must be a positive integer")
        if self.dim % self.num_heads:
            raise ValueError(f"WanDiTConfig.dim={self.dim} must be divisible by num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(
                f"WanDiTConfig.dim / num_heads = {self.head_dim} (head dim) must be even and at least 6: "
                "the 3D rotary embedding splits it into frame, height and width parts"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig.freq_dim={self.freq_dim} must be even (cosine and sine halves)")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p < 1 for p in self.patch_size):
            raise ValueError(
                f"WanDiTConfig.patch_size={list(self.patch_size)} must be 3 positive integers "
                "(time, height, width)"
            )
        if not self.eps > 0:
            raise ValueError(f"WanDiTConfig.eps={self.eps} must be positive")


WAN_DIT_SIZES = {
    # For a CPU cascade on 128x128 frames; not a released model.
    "tiny": WanDiTConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=4, text_dim=64, text_len=128),
    "1.3b": WanDiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "14b": WanDiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}
"""Named sizes; copy one (`dataclasses.replace`) before changing it."""


# --------------------------------------------------------------------------------------------------
# Layers that compute in float32 whatever the dtype of their weights


class Float32Linear(nn.Linear):
    """A Linear that computes in float32 (the time embedding and the head, as in Wan)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float(), self.bias.float())


class Float32LayerNorm(nn.LayerNorm):
    """A LayerNorm that computes in float32 and returns float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned scale, computed in float32, returned in the
    input's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).to(x.dtype)


def linear_then_gelu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """GELU (tanh approximation) of `linear(x)`, the first half of the feed-forward network. On the
    CPU, outside autograd and torch.compile, it is oneDNN's fused kernel, the one torch.compile's CPU
    backend emits for this pair: torch's eager tanh-GELU takes about 5 times as long as its tanh
    there, and the fused kernel also saves a pass over the (B, L, ffn_dim) activations."""
    fused = (not torch.compiler.is_compiling() and x.device.type == "cpu" and torch.backends.mkldnn.is_available()
             and x.dtype == linear.weight.dtype == torch.float32
             and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)))
    if fused:
        return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, "gelu", [], "tanh")
    return F.gelu(linear(x), approximate="tanh")


# --------------------------------------------------------------------------------------------------
# Position and time encodings


def timestep_embedding(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps in [0, 1000] -> (B, dim) float32: cosines then sines of
    timestep / 10000^(i / (dim/2)). The angles are formed in float64 as in the official release
    (B·dim values: free); diffusers forms them in float32, which moves them by up to ~4e-5."""
    half = dim // 2
    frequencies = TIMESTEP_PERIOD ** (
        -torch.arange(half, dtype=torch.float64, device=timestep.device) / half
    )
    angles = timestep.double()[:, None] * frequencies  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_axis_dims(head_dim: int) -> List[int]:
    """How Wan splits a head's channels between frame, height and width rotations."""
    spatial = 2 * (head_dim // 6)
    return [head_dim - 2 * spatial, spatial, spatial]


def rope_rotations(grid: tuple[int, int, int], head_dim: int,
                   frame_positions: Sequence[int] | None = None) -> torch.Tensor:
    """3D rotary embedding for a (frames, height, width) token grid: (L, 1, head_dim/2) complex64 unit
    rotations, L = frames·height·width in raster order. Each channel pair of a head rotates by
    position·frequency along its axis (frame pairs first, then height, then width), frequencies
    1 / theta^(2i / axis_dim). Positions along each axis are 0, 1, 2, …, except the frames' where
    `frame_positions` gives them: a window of frames that are not neighbours in its clip (the
    overview window of flows/windows.py) sits at their places in the clip. Angles are formed in
    float64, as Wan does, per axis (a few thousand values); only the float32 result is expanded."""
    per_axis = []
    for axis, (size, axis_dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        frequencies = 1.0 / ROPE_THETA ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        positions = torch.arange(size, dtype=torch.float64)
        if axis == 0 and frame_positions is not None:
            positions = torch.tensor(list(frame_positions), dtype=torch.float64)
        angles = torch.outer(positions, frequencies)  # (size, axis_dim/2)
        per_axis.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
    frames, height, width = grid
    rotations = torch.cat(
        [
            per_axis[0][:, None, None, :].expand(frames, height, width, -1),
            per_axis[1][None, :, None, :].expand(frames, height, width, -1),
            per_axis[2][None, None, :, :].expand(frames, height, width, -1),
        ],
        dim=-1,
    )  # (frames, height, width, head_dim/2)
    return rotations.reshape(-1, 1, head_dim // 2)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive channel pairs of x (B, L, heads, head_dim) by `rotations` (L, 1, head_dim/2)
    complex, in float32; returns x's dtype."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, L, heads, head_dim/2)
    return torch.view_as_real(pairs * rotations).flatten(3).to(x.dtype)


def patchify(latents: torch.Tensor, patch_size: List[int]) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, C·pt·ph·pw): the patches in raster order (frame, row, column), each
    flattened as the patch embedding's kernel is, (C, pt, ph, pw)."""
    batch, channels, frames, height, width = latents.shape
    patch_t, patch_h, patch_w = patch_size
    x = latents.view(batch, channels, frames // patch_t, patch_t, height // patch_h, patch_h, width // patch_w, patch_w)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T', H', W', C, pt, ph, pw)
    return x.reshape(batch, -1, channels * patch_t * patch_h * patch_w)


# --------------------------------------------------------------------------------------------------
# Attention, block, head


class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm on queries and keys over the full width. Self-attention
    passes `rope` and context = x; cross-attention passes the text as context and no `rope`.
    `attend(q, k, v)` is the attention kernel: plain, or sequence-parallel over shards of x."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, rope: torch.Tensor | None = None,
        attend: Callable[..., torch.Tensor] = attention,
    ) -> torch.Tensor:
        # x: (B, L, dim), context: (B, L_context, dim) -> (B, L, dim) in the weights' dtype
        dtype = self.q.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # (B, L, heads, head_dim)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.o(attend(q, k, v).flatten(2))


class WanBlock(nn.Module):
    """Self-attention with RoPE, cross-attention to the text, feed-forward; the self-attention and
    the feed-forward are modulated by the time embedding (shift, scale, gate), in float32."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        dim, ffn_dim, eps = config.dim, config.ffn_dim, config.eps
        self.norm1 = Float32LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = Float32LayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = WanAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm2 = Float32LayerNorm(dim, eps, elementwise_affine=False)
        # linear, GELU, linear: a Sequential for the official names (ffn.0, ffn.2); the forward runs the
        # first two as one (`linear_then_gelu`)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, time_modulation: torch.Tensor, text: torch.Tensor, rope: torch.Tensor,
        self_attention: Callable[..., torch.Tensor] = attention,
    ) -> torch.Tensor:
        # x: (B, L, dim) float32; time_modulation: (B, 6, dim) float32; text: (B, L_text, dim)
        shift_attn, scale_attn, gate_attn, shift_ffn, scale_ffn, gate_ffn = (
            self.modulation.float() + time_modulation
        ).chunk(6, dim=1)  # each (B, 1, dim)
        h = torch.addcmul(shift_attn, self.norm1(x), 1 + scale_attn)
        x = torch.addcmul(x, self.self_attn(h, h, rope, self_attention), gate_attn)
        x = x + self.cross_attn(self.norm3(x), text)
        h = torch.addcmul(shift_ffn, self.norm2(x), 1 + scale_ffn)
        # the hidden layer (B, L, ffn_dim) is a temporary: freed before the residual sum
        return torch.addcmul(x, self.ffn[2](linear_then_gelu(h.to(self.ffn[0].weight.dtype), self.ffn[0])), gate_ffn)


class WanHead(nn.Module):
    """Modulated LayerNorm and a linear map from tokens to patches of velocity, in float32."""

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        self.norm = Float32LayerNorm(config.dim, config.eps, elementwise_affine=False)
        self.head = Float32Linear(config.dim, config.out_dim * math.prod(config.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor) -> torch.Tensor:
        # x: (B, L, dim), time_embedding: (B, dim) -> (B, L, out_dim·prod(patch_size)) float32
        shift, scale = (self.modulation.float() + time_embedding[:, None]).chunk(2, dim=1)
        return self.head(torch.addcmul(shift, self.norm(x), 1 + scale))


# --------------------------------------------------------------------------------------------------
# The model


class WanDiT(nn.Module):
    """Wan2.1 text-to-video DiT: predicts the flow-matching velocity of video latents.

    Parameter names are the official Wan2.1 ones, so the public state dict loads as it is.
    """

    ROPE_CACHE_SIZE = 4  # grids whose rotations are kept (a run usually uses one)

    def __init__(self, config: WanDiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim, patch = config.dim, config.patch_size
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=patch, stride=patch)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(
            Float32Linear(config.freq_dim, dim), nn.SiLU(), Float32Linear(dim, dim)
        )
        self.time_projection = nn.Sequential(nn.SiLU(), Float32Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = WanHead(config)
        self._rope_cache: dict[tuple, torch.Tensor] = {}  # (grid, frame positions, device) -> rotations; not a buffer
        self._init_weights()

    def _init_weights(self) -> None:
        """Wan's initialisation (for training from scratch): Xavier-uniform linear layers and patch
        embedding, small normal text and time embeddings, a zero output layer."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for module in [*self.text_embedding, *self.time_embedding]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def compile_blocks(self) -> None:
        """Regional compilation: each block is compiled with torch.compile, the rest stays eager. The
        blocks share one compiled graph (the same code; their weights are its inputs), so the first
        call compiles one block, once per new token grid. TeaCache decides outside the blocks; a
        sequence-parallel attention runs inside them, collectives included (torch.compile traces them
        or breaks the graph around them; tests/test_parallel.py checks the result on gloo ranks)."""
        for block in self.blocks:
            block.compile()

    def rope(self, grid: tuple[int, int, int], device: torch.device,
             frame_positions: tuple[int, ...] | None = None) -> torch.Tensor:
        """The rotary embedding of a token grid on `device`, computed once per grid and positions."""
        key = (grid, frame_positions, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= self.ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = rope_rotations(grid, self.config.head_dim, frame_positions).to(device)
        return self._rope_cache[key]

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
        sequence: Optional[SequenceParallel] = None, cache: TeaCache | None = None,
        frame_positions: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """latents (B, in_dim, T, H, W), timestep (B,) in [0, 1000], text (B, text_len, text_dim)
        already zero-padded -> velocity (B, out_dim, T, H, W) float32. Inputs of any float dtype
        are cast to the weights' dtype inside.

        With `sequence` (stages/parallel.py) every rank of its group passes the same inputs and gets
        the same velocity, each computing the blocks and the head on its own shard of the tokens.
        With `cache` (stages/base/teacache.py, one per sampling run) the blocks, and the text
        embedding they need, run only on the steps the cache does not skip.

        `frame_positions` (T / patch_t integers, rising) are the token frames' places for the
        rotary embedding, 0 … T/patch_t − 1 unless given: only their differences matter."""
        self._check_inputs(latents, timestep, text)
        batch, _, frames, height, width = latents.shape
        patch_t, patch_h, patch_w = self.config.patch_size
        grid = (frames // patch_t, height // patch_h, width // patch_w)
        if frame_positions is not None:
            frame_positions = tuple(int(position) for position in frame_positions)
            if len(frame_positions) != grid[0] or any(b <= a for a, b in zip(frame_positions, frame_positions[1:])):
                raise ValueError(f"frame_positions {list(frame_positions)} must be {grid[0]} rising integers, "
                                 f"one per token frame of latents {tuple(latents.shape)}")

        # The patch embedding is a convolution whose stride is its kernel: a linear map of each
        # patch, applied here to the patches of this rank's tokens only.
        x = patchify(latents, self.config.patch_size)  # (B, L, in_dim·patch volume)
        rope = self.rope(grid, latents.device, frame_positions)  # (L, 1, head_dim/2)
        self_attention = attention
        if sequence is not None:  # this rank's tokens, at their global positions
            tokens = x.shape[1]
            x, rope = sequence.shard(x, dim=1), sequence.shard(rope, dim=0)  # (B, L/P, ·), (L/P, 1, ·)
            self_attention = functools.partial(sequence.attention, length=tokens)
        embedding = self.patch_embedding
        x = F.linear(x.to(embedding.weight.dtype), embedding.weight.flatten(1), embedding.bias).float()  # (B, L or L/P, dim)
        time_embedding = self.time_embedding(timestep_embedding(timestep, self.config.freq_dim))  # (B, dim)
        time_modulation = self.time_projection(time_embedding).unflatten(1, (6, -1))  # (B, 6, dim)

        def run_blocks(x: torch.Tensor) -> torch.Tensor:  # (B, L or L/P, dim) float32, same shape out
            context = self.text_embedding(text.to(self.text_embedding[0].weight.dtype))  # (B, text_len, dim)
            for block in self.blocks:
                x = block(x, time_modulation, context, rope, self_attention)
            return x

        if cache is None:
            # Handed to the blocks, not kept here: each block's input is freed while the next one runs, one
            # (B, L, dim) float32 tensor less at the peak. TeaCache keeps it (its residual is out − in).
            handed_over = [x]
            del x
            x = run_blocks(handed_over.pop())
        else:
            x = cache(x, time_modulation, run_blocks)
        x = self.head(x, time_embedding)  # (B, L, out_dim·patch_t·patch_h·patch_w)
        if sequence is not None:
            x = sequence.gather(x, tokens, dim=1)

        x = x.view(batch, *grid, patch_t, patch_h, patch_w, self.config.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', patch_t, H', patch_h, W', patch_w)
        return x.reshape(batch, self.config.out_dim, frames, height, width)

    def _check_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> None:
        config = self.config
        if latents.ndim != 5 or latents.shape[1] != config.in_dim:
            raise ValueError(f"latents must be (B, {config.in_dim}, T, H, W), got {tuple(latents.shape)}")
        if any(size % patch for size, patch in zip(latents.shape[2:], config.patch_size)):
            raise ValueError(
                f"latent size (T, H, W) = {tuple(latents.shape[2:])} must be divisible by "
                f"patch_size {list(config.patch_size)}"
            )
        batch = latents.shape[0]
        if timestep.shape != (batch,):
            raise ValueError(f"timestep must be ({batch},) for {batch} latents, got {tuple(timestep.shape)}")
        if text.shape != (batch, config.text_len, config.text_dim):
            raise ValueError(
                f"text must be (B={batch}, text_len={config.text_len}, text_dim={config.text_dim}), "
                f"zero-padded by the caller; got {tuple(text.shape)}"
            )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: WanDiTConfig | None = None, dtype: torch.dtype = torch.float32
    ) -> "WanDiT":
        """Loads a checkpoint in the official Wan2.1 or the diffusers layout.

        `path` is a folder (official: `diffusion_pytorch_model.safetensors` or its sharded
        `.safetensors.index.json` with `config.json`; diffusers: the same file names with a
        diffusers `config.json`, the `transformer/` folder or the pipeline folder holding it) or a
        single weights file (`.safetensors`, `.safetensors.index.json`, `.pth`) whose sizes come
        from `config` or from a `config.json` beside it. `config`, when given, overrides config.json.
        Weights are cast to `dtype`, except the small parts Wan computes in float32.
        """
        weights_file, config_file = locate_checkpoint(Path(path))
        if config is None:
            if config_file is None:
                raise WeightsError(
                    f"no config for {weights_file}: pass config= (e.g. WAN_DIT_SIZES['1.3b']) or put a "
                    "config.json beside it"
                )
            config = read_config(config_file)
        state_dict = read_state_dict(weights_file)
        if any(key.startswith("condition_embedder.") for key in state_dict):
            state_dict = official_state_dict_from_diffusers(state_dict)
        with torch.device("meta"):  # no time spent initialising weights that are overwritten
            model = cls(config)
        model.to(dtype)
        # as in Wan, the time embedding, the modulation, norm3 and the head keep float32 weights
        for module in model.modules():
            if isinstance(module, (Float32Linear, Float32LayerNorm)):
                module.float()
        for block_or_head in [*model.blocks, model.head]:
            block_or_head.modulation.data = block_or_head.modulation.data.float()
        model.to_empty(device="cpu")
        load_into(model, state_dict, source=str(weights_file))
        return model


# --------------------------------------------------------------------------------------------------
# Checkpoint layouts

WEIGHTS_FILE_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")

# diffusers module name -> official module name; "#" stands for a block index.
DIFFUSERS_TO_OFFICIAL = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "blocks.#.attn1.to_q": "blocks.#.self_attn.q",
    "blocks.#.attn1.to_k": "blocks.#.self_attn.k",
    "blocks.#.attn1.to_v": "blocks.#.self_attn.v",
    "blocks.#.attn1.to_out.0": "blocks.#.self_attn.o",
    "blocks.#.attn1.norm_q": "blocks.#.self_attn.norm_q",
    "blocks.#.attn1.norm_k": "blocks.#.self_attn.norm_k",
    "blocks.#.attn2.to_q": "blocks.#.cross_attn.q",
    "blocks.#.attn2.to_k": "blocks.#.cross_attn.k",
    "blocks.#.attn2.to_v": "blocks.#.cross_attn.v",
    "blocks.#.attn2.to_out.0": "blocks.#.cross_attn.o",
    "blocks.#.attn2.norm_q": "blocks.#.cross_attn.norm_q",
    "blocks.#.attn2.norm_k": "blocks.#.cross_attn.norm_k",
    "blocks.#.norm2": "blocks.#.norm3",
    "blocks.#.ffn.net.0.proj": "blocks.#.ffn.0",
    "blocks.#.ffn.net.2": "blocks.#.ffn.2",
    "blocks.#.scale_shift_table": "blocks.#.modulation",  # a parameter, not a module
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",  # a parameter, not a module
}


def official_state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a diffusers `WanTransformer3DModel` state dict to the official Wan2.1 names. Names
    the table does not know (such as `patch_embedding.*`, the same in both) pass through unchanged,
    so loading reports any foreign key by its own name."""
    renamed = {}
    for key, tensor in state_dict.items():
        block = re.match(r"blocks\.(\d+)\.", key)
        generic = f"blocks.#.{key[block.end():]}" if block else key
        module, _, parameter = generic.rpartition(".")
        if generic in DIFFUSERS_TO_OFFICIAL:
            generic = DIFFUSERS_TO_OFFICIAL[generic]
        elif module in DIFFUSERS_TO_OFFICIAL:
            generic = f"{DIFFUSERS_TO_OFFICIAL[module]}.{parameter}"
        renamed[generic.replace("#", block.group(1)) if block else generic] = tensor
    return renamed


def locate_checkpoint(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a weights file or a checkpoint folder."""
    if path.is_file():
        config_file = path.parent / "config.json"
        return path, config_file if config_file.is_file() else None
    if not path.is_dir():
        raise WeightsError(f"checkpoint not found: {path}")
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        path = path / "transformer"  # a diffusers pipeline folder
    for name in WEIGHTS_FILE_NAMES:
        if (path / name).is_file() and (path / "config.json").is_file():
            return path / name, path / "config.json"
    raise WeightsError(
        f"{path} is not a Wan DiT checkpoint folder: expected config.json with "
        f"{' or '.join(WEIGHTS_FILE_NAMES)} (official layout or a diffusers transformer/ folder)"
    )


def read_config(config_file: Path) -> WanDiTConfig:
    """Reads an official (`dim`, `num_heads`, ...) or diffusers (`num_attention_heads`,
    `attention_head_dim`, ...) DiT config.json."""
    try:
        raw = json.loads(Path(config_file).read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read {config_file}: {error}") from None
    entries = {key: value for key, value in raw.items() if not key.startswith("_")}
    if "num_attention_heads" in entries:
        entries = _official_entries_from_diffusers(entries, config_file)
    elif "dim" not in entries:
        raise WeightsError(
            f"{config_file} is neither an official Wan config (with dim, num_heads, ...) nor a diffusers "
            "one (with num_attention_heads, attention_head_dim, ...)"
        )
    model_type = entries.pop("model_type", "t2v")
    window_size = entries.pop("window_size", [-1, -1])
    if model_type != "t2v" or list(window_size) != [-1, -1]:
        raise WeightsError(
            f"{config_file} describes model_type={model_type!r}, window_size={window_size}; only the "
            "text-to-video model (t2v, window_size [-1, -1]) is supported"
        )
    known = {f.name for f in fields(WanDiTConfig)}
    unknown = sorted(set(entries) - known)
    if unknown:
        raise WeightsError(f"{config_file} has keys WanDiTConfig does not know: {', '.join(unknown)}")
    if "patch_size" in entries:
        entries["patch_size"] = list(entries["patch_size"])
    try:
        return WanDiTConfig(**entries)
    except ValueError as error:
        raise WeightsError(f"{config_file}: {error}") from None


def _official_entries_from_diffusers(entries: dict, config_file: Path) -> dict:
    image_inputs = {key: entries.get(key) for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")}
    if any(value is not None for value in image_inputs.values()):
        raise WeightsError(
            f"{config_file} describes an image-conditioned model ({image_inputs}); only t2v is supported"
        )
    official = {
        "dim": entries["num_attention_heads"] * entries["attention_head_dim"],
        "num_heads": entries["num_attention_heads"],
        # diffusers always applies its q/k RMSNorm, whatever its `qk_norm` entry says
        "qk_norm": True,
    }
    if entries.get("out_channels") is None and "in_channels" in entries:
        entries = {**entries, "out_channels": entries["in_channels"]}  # diffusers' default
    renames = {"in_channels": "in_dim", "out_channels": "out_dim"}
    # rope_max_seq_len bounds diffusers' precomputed rotations; ours are computed for any grid
    consumed = {"num_attention_heads", "attention_head_dim", "qk_norm", "rope_max_seq_len", *image_inputs}
    for key, value in entries.items():
        if key not in consumed:
            official[renames.get(key, key)] = value
    return official
