"""The Wan2.1 video VAE: a causal 3D convolutional autoencoder, weight-compatible with `Wan2.1_VAE.pth`.

A clip of 1 + 4k frames (B, 3, T, H, W) in [-1, 1] becomes 1 + k latent frames (B, 16, T', H/8, W/8):
the first frame is encoded alone, so a single image is a one-frame clip, and every later latent frame
summarises the next 4 frames. Every convolution over time is causal (padded on the past side only),
so the clip can be processed in chunks: the encoder takes the first frame, then 4 frames at a time;
the decoder takes one latent frame at a time. Between chunks each causal layer remembers the last
input frames its next chunk needs (`StreamCache`), so chunked processing gives the same result as
one pass over the whole clip while memory stays that of one chunk.

Latents are normalised per channel, z = (mu − mean) / std, with Wan's published mean and std, and the
encoder returns the posterior mean (no sampling). Large frames can be split into overlapping spatial
tiles whose overlaps are blended linearly (`tile_size`, `tile_overlap`).

Parameter names are those of the official checkpoint (`encoder.downsamples.N.residual.0.gamma`, ...);
`official_state_dict_from_diffusers` renames a diffusers `AutoencoderKLWan` state dict onto them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from stages.weights import WeightsError, load_into, read_state_dict

OFFICIAL_CHECKPOINT_NAME = "Wan2.1_VAE.pth"
DIFFUSERS_CONFIG_NAME = "config.json"
DIFFUSERS_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")
DIFFUSERS_VAE_FOLDER = "vae"

WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class WanVAEConfig:
    """Sizes of the VAE, its latent normalisation, and optional spatial tiling."""

    base_dim: int = 96  # channels of the outermost level; level i has base_dim · dim_mult[i]
    z_dim: int = 16  # latent channels
    dim_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    # For each of the len(dim_mult) − 1 encoder downsamplings, whether it also halves time (the
    # decoder mirrors it). Time compression is 2 ** (number of True), space 2 ** len(this list).
    temporal_downsample: List[bool] = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    latents_mean: List[float] = field(default_factory=lambda: list(WAN_LATENTS_MEAN))
    latents_std: List[float] = field(default_factory=lambda: list(WAN_LATENTS_STD))
    tile_size: int = 0  # spatial tile side in latent pixels; 0 = no tiling
    tile_overlap: int = 8  # overlap of neighbouring tiles in latent pixels, blended linearly


# Named configurations; copy one with `dataclasses.replace` before changing it.
WAN_VAE_SIZES: dict[str, WanVAEConfig] = {
    # Same structure and compression (4x time, 8x space, 16 channels), 1/6 of the width and one
    # residual block per encoder level instead of two: for a CPU cascade at 128x128, trained on the
    # procedural world (`train_stage.py vae`).
    "tiny": WanVAEConfig(base_dim=16, num_res_blocks=1),
    "wan2.1": WanVAEConfig(),
}


def _check_config(config: WanVAEConfig) -> None:
    if len(config.temporal_downsample) != len(config.dim_mult) - 1:
        raise ValueError(
            f"temporal_downsample {config.temporal_downsample} must have one entry per downsampling, "
            f"len(dim_mult) - 1 = {len(config.dim_mult) - 1}"
        )
    for name in ("latents_mean", "latents_std"):
        if len(getattr(config, name)) != config.z_dim:
            values = len(getattr(config, name))
            raise ValueError(f"{name} has {values} values; z_dim = {config.z_dim} needs one per channel")
    if config.tile_size < 0 or config.tile_overlap < 0:
        raise ValueError(f"tile_size {config.tile_size} and tile_overlap {config.tile_overlap} must be >= 0")
    if config.tile_size > 0 and config.tile_overlap >= config.tile_size:
        raise ValueError(f"tile_overlap {config.tile_overlap} must be smaller than tile_size {config.tile_size}")


# ---------------------------------------------------------------------------------------------------
# Causal streaming: the state carried between the chunks of one clip
# ---------------------------------------------------------------------------------------------------


class StreamCache:
    """What the causal layers of one network remember between the chunks of one clip: for each
    layer, the last input frames its next chunk needs; and whether the chunk now running is the
    clip's first (the first frame is treated apart by the temporal resampling layers)."""

    def __init__(self) -> None:
        self.first_chunk = True
        self.past_frames: dict[nn.Module, torch.Tensor] = {}

    def keep(self, layer: nn.Module, frames: torch.Tensor) -> None:
        """Remembers a copy of `frames` for `layer`'s next chunk. The copy goes into the buffer kept
        from the previous chunk where the shape allows, so the cache allocates nothing per chunk
        (fresh cache tensors each chunk, placed among that chunk's large temporaries, fragment the
        CPU heap and raise the process's resident memory)."""
        kept = self.past_frames.get(layer)
        if kept is not None and kept.shape == frames.shape:
            kept.copy_(frames)
        else:
            self.past_frames[layer] = frames.clone()


class Streaming:
    """Marks the layers whose `forward(x, cache)` takes the `StreamCache`."""


def run_layers(layers: Iterable[nn.Module], x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Runs `layers` in order, giving the cache to the streaming ones."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, Streaming) else layer(x)
    return x


class CausalConv3d(nn.Conv3d, Streaming):
    """A 3D convolution that pads time on the past side only, so output frame t sees input frames
    up to t: a time `padding` p puts 2p zero frames before the clip (as the official layer does).
    Space is padded on both sides by the convolution itself.

    With a cache, `x` is the next chunk of a clip: it is prefixed with the frames this layer kept
    from the previous chunk (zeros before the first chunk), exactly as if the whole clip had been
    convolved at once. Without a cache, `x` is a whole clip."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        kernel_size = _triple(kernel_size)
        stride = _triple(stride)
        time_padding, height_padding, width_padding = _triple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=(0, height_padding, width_padding))
        self.past_length = 2 * time_padding  # zero frames before the first frame
        self.kept_length = kernel_size[0] - stride[0]  # input frames the next chunk needs

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        past = cache.past_frames.get(self) if cache is not None else None
        if past is None and self.past_length > 0:
            batch, channels, _, height, width = x.shape
            past = x.new_zeros(batch, channels, self.past_length, height, width)
        if past is not None:
            x = torch.cat([past, x], dim=2)
        if cache is not None and self.kept_length > 0:
            cache.keep(self, x[:, :, -self.kept_length :])  # after the cat: the old past is no longer read
        return self._convolve(x)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W), already padded in time
        """The 3D convolution, computed as one 2D convolution per output frame over the frames of
        its window stacked on the channels (the weight (O, C, k, kh, kw) viewed as (O, C·k, kh, kw)):
        the same sums as conv3d, but on the CPU torch runs conv3d of small inputs (a frame or two
        of a few hundred pixels, as chunks and tiles give) on a native path 5-8x slower."""
        batch, channels, frames, height, width = x.shape
        depth, step = self.kernel_size[0], self.stride[0]
        weight = self.weight.flatten(1, 2)
        outputs = [
            F.conv2d(x[:, :, start : start + depth].reshape(batch, channels * depth, height, width), weight,
                     self.bias, self.stride[1:], self.padding[1:])
            for start in range(0, frames - depth + 1, step)
        ]
        return outputs[0].unsqueeze(2) if len(outputs) == 1 else torch.stack(outputs, dim=2)


def _triple(value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖ over the channels of x (B, C, ...), as (B, 1, ...) float32: half-precision sums of
    squares overflow. On the CPU torch's vector_norm over a middle dim is slow (13 ms against 0.3 ms
    for (1, 16, 4, 128, 128) on 2 cores), so there the squares are summed a channel at a time into
    one float32 buffer; on a GPU vector_norm is fast and one call."""
    if x.device.type != "cpu":
        return torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    first = x[:, :1].float()
    squares = first * first
    for index in range(1, x.shape[1]):
        channel = x[:, index : index + 1].float()
        squares.addcmul_(channel, channel)
    return squares.sqrt()  # not in place: autograd (VAE training) needs sqrt's output


class RMSNorm(nn.Module):
    """x / ‖x‖ over channels, times √C · gamma. `gamma` is stored as (C, 1, 1, 1) in residual blocks
    and (C, 1, 1) in attention blocks, as in the official checkpoint; both act per channel."""

    def __init__(self, channels: int, gamma_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = channels**0.5
        self.gamma = nn.Parameter(torch.ones(gamma_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        norm = channel_norm(x).clamp_min(1e-12)  # as F.normalize does
        return (x / norm.to(x.dtype)).mul_(self.gamma.view(-1, 1, 1, 1) * self.scale)


class FrameConv2d(nn.Conv2d):
    """A 2D convolution applied to every frame of a clip (B, C, T, H, W). (torch's conv3d with a
    depth-1 kernel takes a slow path with a large buffer on the CPU; conv2d does not.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, frames, _, _ = x.shape
        out = super().forward(x.transpose(1, 2).flatten(0, 1))  # (B·T, C', H', W'); a view when T == 1
        return out.view(batch, frames, *out.shape[1:]).transpose(1, 2)


class FrameUpsample2x(nn.Module):
    """Nearest-neighbour doubling of height and width of every frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, C, T, 2H, 2W)
        return F.interpolate(x.float(), scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact").to(x.dtype)


class PadRightBottom(nn.Module):
    """One zero row below and one zero column right of every frame, before a stride-2 3x3 conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class ResidualBlock(nn.Module, Streaming):
    """RMSNorm → SiLU → causal conv → RMSNorm → SiLU → dropout → causal conv, plus a shortcut (a 1x1x1
    conv where the channel count changes)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        # Indices 0..6 are the checkpoint's `residual.N` names.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, (in_dim, 1, 1, 1)),
            nn.SiLU(inplace=True),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, (out_dim, 1, 1, 1)),
            nn.SiLU(inplace=True),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        residual = run_layers(self.residual, x, cache)
        return residual.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (frames do not attend to each
    other, so it needs no cache)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, (dim, 1, 1))
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        batch, channels, frames, height, width = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, channels)
        query, key, value = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).chunk(3, dim=-1)
        # One head of width C (384 in Wan2.1): wider than flash-attn supports, so torch SDPA directly.
        attended = F.scaled_dot_product_attention(query, key, value)  # (B·T, H·W, C)
        out = F.linear(attended, self.proj.weight.flatten(1), self.proj.bias)
        return out.view(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3) + x


class Resample(nn.Module, Streaming):
    """Halves or doubles height and width; the "3d" modes also halve or double time, causally.

    downsample3d: the first frame passes alone; later frames are taken in pairs by a stride-2 causal
    conv over time that also sees the last frame of the previous pair (so 1 + 2n frames -> 1 + n).
    upsample3d: the first frame stays one frame; every later frame becomes two, made by a causal conv
    over time (over the frames after the first) giving 2C channels, split into two frames (1 + n
    frames -> 1 + 2n). The spatial upsampling conv also halves the channels.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        # `resample.1` and `time_conv` are the checkpoint's names.
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(FrameUpsample2x(), FrameConv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(PadRightBottom(), FrameConv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:  # (B, C, T, H, W)
        if self.mode == "upsample3d" and not cache.first_chunk:
            batch, channels, frames, height, width = x.shape
            doubled = self.time_conv(x, cache)  # (B, 2C, T, H, W): two output frames per input frame
            x = doubled.view(batch, 2, channels, frames, height, width).permute(0, 2, 3, 1, 4, 5)
            x = x.reshape(batch, channels, 2 * frames, height, width)
        x = self.resample(x)
        if self.mode == "downsample3d":
            if cache.first_chunk:  # the first frame passes; it is the past of the next pair
                cache.keep(self.time_conv, x[:, :, -1:])
            else:
                x = self.time_conv(x, cache)
        return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        RMSNorm(in_dim, (in_dim, 1, 1, 1)), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim, 3, padding=1)
    )


class Encoder3d(nn.Module):
    """Frames (B, 3, T, H, W) -> mean and log-variance (B, 2·z_dim, T', H/8, W/8), one chunk at a time."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * multiple for multiple in [1, *config.dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        downsamples: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level < len(config.temporal_downsample):
                mode = "downsample3d" if config.temporal_downsample[level] else "downsample2d"
                downsamples.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*downsamples)
        self.middle = _middle(dims[-1], config.dropout)
        self.head = _head(dims[-1], 2 * config.z_dim)
        # Up to the first temporal downsampling every layer maps frame t to frame t: those layers
        # run one frame at a time, so the largest activations (full resolution) hold one frame.
        temporal = _resample_indices(self.downsamples, "downsample3d")
        self.frame_layer_count = 1 + (temporal[0] if temporal else len(self.downsamples))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        layers = [self.conv1, *self.downsamples, *self.middle, *self.head]
        x = run_frame_by_frame(layers[: self.frame_layer_count], x, cache)
        return run_layers(layers[self.frame_layer_count :], x, cache)


class Decoder3d(nn.Module):
    """Latents (B, z_dim, T', h, w) -> frames (B, 3, T, 8h, 8w), one latent frame at a time."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.base_dim * multiple for multiple in [config.dim_mult[-1], *config.dim_mult[::-1]]]
        temporal_upsample = config.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], config.dropout)
        upsamples: list[nn.Module] = []
        for level, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if level > 0:
                in_dim //= 2  # the upsampling conv before this level halved the channels
            for _ in range(config.num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, out_dim, config.dropout))
                in_dim = out_dim
            if level < len(temporal_upsample):
                mode = "upsample3d" if temporal_upsample[level] else "upsample2d"
                upsamples.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*upsamples)
        self.head = _head(dims[-1], 3)
        # After the last temporal upsampling every layer maps frame t to frame t: those layers run
        # one frame at a time, so the largest activations (full resolution) hold one frame, not 4.
        temporal = _resample_indices(self.upsamples, "upsample3d")
        self.clip_layer_count = 1 + len(self.middle) + (temporal[-1] + 1 if temporal else 0)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        layers = [self.conv1, *self.middle, *self.upsamples, *self.head]
        x = run_layers(layers[: self.clip_layer_count], x, cache)
        return run_frame_by_frame(layers[self.clip_layer_count :], x, cache)


def _resample_indices(layers: nn.Sequential, mode: str) -> list[int]:
    """Indices of the `Resample` layers of `mode` in `layers`."""
    return [index for index, layer in enumerate(layers) if isinstance(layer, Resample) and layer.mode == mode]


def run_frame_by_frame(layers: list[nn.Module], x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Runs layers that map frame t to frame t (after their causal past) over x one frame at a
    time: the same result as all of x at once, with one frame's activations instead of all's."""
    if x.shape[2] == 1 or not layers:
        return run_layers(layers, x, cache)
    return torch.cat([run_layers(layers, frame, cache) for frame in x.split(1, dim=2)], dim=2)


# ---------------------------------------------------------------------------------------------------
# Spatial tiling
# ---------------------------------------------------------------------------------------------------


def tile_spans(size: int, tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) of tiles of `tile_size` covering [0, size), each overlapping the previous by at
    least `overlap`; the last tile is moved back to end at `size`. One span if the size fits."""
    if tile_size <= 0 or size <= tile_size:
        return [(0, size)]
    starts = [*range(0, size - tile_size, tile_size - overlap), size - tile_size]
    return [(start, start + tile_size) for start in starts]


def blend_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Weights of each tile along one axis, at `scale` times the spans' resolution: 1 inside, a
    linear ramp across each overlap, normalised so that the tiles' weights sum to 1 everywhere."""
    ramps = []
    for index, (start, end) in enumerate(spans):
        weight = torch.ones((end - start) * scale)
        if index > 0 and (overlap := (spans[index - 1][1] - start) * scale) > 0:
            weight[:overlap] = torch.minimum(weight[:overlap], torch.arange(1, overlap + 1) / (overlap + 1))
        if index + 1 < len(spans) and (overlap := (end - spans[index + 1][0]) * scale) > 0:
            weight[-overlap:] = torch.minimum(weight[-overlap:], torch.arange(overlap, 0, -1) / (overlap + 1))
        ramps.append(weight)
    total = torch.zeros(spans[-1][1] * scale)
    for (start, end), weight in zip(spans, ramps):
        total[start * scale : end * scale] += weight
    return [weight / total[start * scale : end * scale] for (start, end), weight in zip(spans, ramps)]


class SpatialTiling:
    """Overlapping spatial tiles of a clip, laid out in latent pixels, and the linear blend that
    joins the network's outputs on them. `input_scale`/`output_scale` are pixels per latent pixel
    of the network's input and output (8 and 1 for the encoder, 1 and 8 for the decoder)."""

    def __init__(self, latent_height: int, latent_width: int, config: WanVAEConfig, input_scale: int,
                 output_scale: int) -> None:
        self.row_spans = tile_spans(latent_height, config.tile_size, config.tile_overlap)
        self.column_spans = tile_spans(latent_width, config.tile_size, config.tile_overlap)
        self.row_weights = blend_weights(self.row_spans, output_scale)
        self.column_weights = blend_weights(self.column_spans, output_scale)
        self.input_scale = input_scale
        self.output_scale = output_scale

    def __len__(self) -> int:
        return len(self.row_spans) * len(self.column_spans)

    def run(self, network: Callable[[torch.Tensor, StreamCache], torch.Tensor], x: torch.Tensor,
            caches: list[StreamCache]) -> torch.Tensor:
        """`network(tile, cache)` on every tile of x (B, C, T, H, W), each tile with its own cache."""
        if len(self) == 1:
            return network(x, caches[0])
        inp, out = self.input_scale, self.output_scale
        blended = None
        tiles = itertools.product(zip(self.row_spans, self.row_weights), zip(self.column_spans, self.column_weights))
        for cache, (((top, bottom), row_weight), ((left, right), column_weight)) in zip(caches, tiles):
            piece = network(x[..., top * inp : bottom * inp, left * inp : right * inp], cache)
            if blended is None:
                height, width = self.row_spans[-1][1] * out, self.column_spans[-1][1] * out
                blended = piece.new_zeros(*piece.shape[:3], height, width)
            weight = (row_weight[:, None] * column_weight[None, :]).to(piece)  # (h, w)
            blended[..., top * out : bottom * out, left * out : right * out].addcmul_(piece, weight)
        return blended


def stream(network: Callable[[torch.Tensor, StreamCache], torch.Tensor], chunks: Iterable[torch.Tensor],
           tiling: SpatialTiling) -> Iterator[torch.Tensor]:
    """Runs `network` over the chunks of one clip in order, carrying one cache per tile."""
    caches = [StreamCache() for _ in range(len(tiling))]
    for chunk in chunks:
        yield tiling.run(network, chunk, caches)
        for cache in caches:
            cache.first_chunk = False


# ---------------------------------------------------------------------------------------------------
# The VAE
# ---------------------------------------------------------------------------------------------------


class WanVAE(nn.Module):
    """The Wan2.1 VAE. `encode` maps frames to normalised latents, `decode`/`iter_decode` map them
    back, without autograd (the VAE is frozen in the cascade); training uses `posterior` and
    `decode_chunks`, which work on latents before normalisation and keep the graph."""

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else WanVAEConfig()
        _check_config(config)
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)  # -> posterior mean, log-variance
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)  # latents -> decoder input
        self.decoder = Decoder3d(config)

    @property
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.config.temporal_downsample)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent pixel along height and width (8 for Wan2.1)."""
        return 2 ** len(self.config.temporal_downsample)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _latent_statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the latents, float32, (1, z_dim, 1, 1, 1)."""
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, std

    def posterior(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8 -> the posterior's
        mean and log-variance (B, z_dim, 1 + k, H/8, W/8), not normalised. Builds the autograd graph
        when gradients are on (training); `encode` is the frozen use."""
        _, _, num_frames, height, width = self._check_frames(frames)
        x = frames.to(self.dtype)
        step, scale = self.temporal_compression, self.spatial_compression
        chunks = [x[:, :, :1], *(x[:, :, start : start + step] for start in range(1, num_frames, step))]
        tiling = SpatialTiling(height // scale, width // scale, self.config, input_scale=scale, output_scale=1)
        features = torch.cat(list(stream(self.encoder, chunks, tiling)), dim=2)  # (B, 2·z_dim, T', h, w)
        mu, log_variance = self.conv1(features).chunk(2, dim=1)
        return mu, log_variance

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, 3, T, H, W) in [-1, 1] with T = 1 + 4k and H, W multiples of 8 -> float32
        normalised latents (B, z_dim, 1 + k, H/8, W/8): the posterior mean mu, as (mu − mean) / std."""
        mu, _ = self.posterior(frames)
        mean, std = self._latent_statistics(mu.device)
        return (mu.float() - mean) / std

    def decode_chunks(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Latents z (B, z_dim, T', h, w), not normalised -> frames, unclamped, one latent frame at
        a time (1 frame, then 4 per latent frame). Builds the autograd graph when gradients are on."""
        _, _, _, height, width = self._check_latents(z)
        tiling = SpatialTiling(height, width, self.config, input_scale=1, output_scale=self.spatial_compression)
        yield from stream(self.decoder, self.conv2(z.to(self.dtype)).split(1, dim=2), tiling)

    @torch.no_grad()
    def iter_decode(self, latents: torch.Tensor,
                    progress: Callable[[int, int], None] | None = None) -> Iterator[torch.Tensor]:
        """Normalised latents (B, z_dim, T', h, w) -> frames in [-1, 1], one latent frame at a time:
        yields (B, 3, 1, 8h, 8w) for the first latent frame, then (B, 3, 4, 8h, 8w) for each next
        one, in the model's dtype. Memory stays that of one chunk whatever the clip length.
        `progress(done_latent_frames, total)` is called before each chunk is yielded."""
        num_latent_frames = self._check_latents(latents)[2]
        mean, std = self._latent_statistics(latents.device)
        for done, frames in enumerate(self.decode_chunks(latents.float() * std + mean), start=1):
            if progress is not None:
                progress(done, num_latent_frames)
            yield frames.clamp_(-1.0, 1.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, z_dim, T', h, w) -> frames (B, 3, 1 + 4(T' − 1), 8h, 8w) in [-1, 1]."""
        batch, _, num_latent_frames, height, width = self._check_latents(latents)
        scale = self.spatial_compression
        num_frames = 1 + self.temporal_compression * (num_latent_frames - 1)
        frames = torch.empty(batch, 3, num_frames, height * scale, width * scale, dtype=self.dtype,
                             device=latents.device)
        start = 0
        for chunk in self.iter_decode(latents):
            frames[:, :, start : start + chunk.shape[2]] = chunk
            start += chunk.shape[2]
        return frames

    def _check_frames(self, frames: torch.Tensor) -> torch.Size:
        if frames.dim() != 5 or frames.shape[1] != 3:
            raise ValueError(f"frames must be shaped (B, 3, T, H, W); got {tuple(frames.shape)}")
        _, _, num_frames, height, width = frames.shape
        step, scale = self.temporal_compression, self.spatial_compression
        if num_frames < 1 or (num_frames - 1) % step:
            raise ValueError(f"frame count {num_frames} must be 1 + {step}k (1, {1 + step}, {1 + 2 * step}, ...)")
        if height % scale or width % scale:
            raise ValueError(f"frame size {height}x{width} (HxW) must be a multiple of {scale} on both sides")
        return frames.shape

    def _check_latents(self, latents: torch.Tensor) -> torch.Size:
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim or latents.shape[2] < 1:
            raise ValueError(
                f"latents must be shaped (B, {self.config.z_dim}, T', h, w) with T' >= 1; got {tuple(latents.shape)}"
            )
        return latents.shape

    @classmethod
    def from_pretrained(cls, path: str | Path, config: WanVAEConfig | None = None,
                        dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Loads the official `Wan2.1_VAE.pth` (the file, or a folder holding it) or a diffusers VAE
        folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a pipeline folder with
        `vae/`). `config` gives the sizes for the official file (default: Wan2.1's) and the tiling;
        a diffusers folder's sizes and latent statistics come from its `config.json`."""
        path = Path(path)
        config = config if config is not None else WanVAEConfig()
        if path.is_dir() and (path / DIFFUSERS_VAE_FOLDER / DIFFUSERS_CONFIG_NAME).is_file():
            path = path / DIFFUSERS_VAE_FOLDER
        if path.is_dir() and (path / OFFICIAL_CHECKPOINT_NAME).is_file():
            path = path / OFFICIAL_CHECKPOINT_NAME
        if path.is_file():
            state_dict = read_state_dict(path)
        elif path.is_dir() and (path / DIFFUSERS_CONFIG_NAME).is_file():
            config = config_from_diffusers(path / DIFFUSERS_CONFIG_NAME, config)
            weights = [path / name for name in DIFFUSERS_WEIGHTS_NAMES if (path / name).is_file()]
            if not weights:
                raise WeightsError(
                    f"diffusers VAE folder {path} has {DIFFUSERS_CONFIG_NAME} but no {DIFFUSERS_WEIGHTS_NAMES[0]}"
                )
            state_dict = official_state_dict_from_diffusers(read_state_dict(weights[0]))
        else:
            raise WeightsError(
                f"no VAE checkpoint at {path}: expected the official {OFFICIAL_CHECKPOINT_NAME} (or a folder "
                f"holding it), or a diffusers VAE folder with {DIFFUSERS_CONFIG_NAME} and {DIFFUSERS_WEIGHTS_NAMES[0]}"
            )
        if path.suffix == ".safetensors":
            config = _with_metadata_statistics(path, config)
        model = cls(config).to(dtype)
        load_into(model, state_dict, str(path))
        return model.eval()


# ---------------------------------------------------------------------------------------------------
# Latent statistics in a safetensors file's metadata (how the project's own trained VAEs carry them)

_STATISTICS_KEYS = ("latents_mean", "latents_std")


def latent_statistics_metadata(mean: list[float], std: list[float]) -> dict[str, str]:
    """The metadata entries under which a safetensors VAE file carries its latent statistics."""
    return {"latents_mean": json.dumps(list(mean)), "latents_std": json.dumps(list(std))}


def _with_metadata_statistics(path: Path, config: WanVAEConfig) -> WanVAEConfig:
    """`config` with the latent statistics of `path`'s metadata, where it has them."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
    if not all(key in metadata for key in _STATISTICS_KEYS):
        return config
    try:
        values = {key: [float(value) for value in json.loads(metadata[key])] for key in _STATISTICS_KEYS}
    except (ValueError, TypeError) as error:
        raise WeightsError(f"VAE weights {path}: unreadable latent statistics in the metadata: {error}") from None
    if any(len(value) != config.z_dim for value in values.values()):
        raise WeightsError(f"VAE weights {path}: latent statistics in the metadata do not have z_dim={config.z_dim} entries")
    return replace(config, **values)


# ---------------------------------------------------------------------------------------------------
# The diffusers layout
# ---------------------------------------------------------------------------------------------------

# diffusers `AutoencoderKLWan` config field -> WanVAEConfig field.
_DIFFUSERS_CONFIG_FIELDS = {
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temporal_downsample",
    "dropout": "dropout",
    "latents_mean": "latents_mean",
    "latents_std": "latents_std",
}
# diffusers config values this Wan2.1 VAE requires (other values mean another model, e.g. Wan2.2's).
_DIFFUSERS_REQUIRED_VALUES = {
    "attn_scales": [],
    "is_residual": False,
    "patch_size": None,
    "in_channels": 3,
    "out_channels": 3,
}


def config_from_diffusers(config_path: Path, base: WanVAEConfig) -> WanVAEConfig:
    """`base` with the sizes and latent statistics of a diffusers VAE `config.json`."""
    try:
        values = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as error:
        raise WeightsError(f"cannot read VAE config {config_path}: {error}") from None
    for name, required in _DIFFUSERS_REQUIRED_VALUES.items():
        if name in values and values[name] != required:
            raise WeightsError(f"{config_path}: {name} = {values[name]!r} is not a Wan2.1 VAE (needs {required!r})")
    decoder_base_dim = values.get("decoder_base_dim")
    if decoder_base_dim is not None and decoder_base_dim != values.get("base_dim", base.base_dim):
        raise WeightsError(f"{config_path}: decoder_base_dim = {decoder_base_dim} differs from base_dim; not supported")
    sizes = {ours: values[theirs] for theirs, ours in _DIFFUSERS_CONFIG_FIELDS.items() if theirs in values}
    return replace(base, **sizes)


# diffusers name -> official name, applied in order to every key (after `_flatten_up_blocks`). The
# last five rename the layers inside any residual block: an index followed by norm1, conv1, ...
_DIFFUSERS_RENAMES: list[tuple[str, str]] = [
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.", "encoder.downsamples."),
    (r"\.(\d+)\.norm1\.", r".\1.residual.0."),
    (r"\.(\d+)\.conv1\.", r".\1.residual.2."),
    (r"\.(\d+)\.norm2\.", r".\1.residual.3."),
    (r"\.(\d+)\.conv2\.", r".\1.residual.6."),
    (r"\.(\d+)\.conv_shortcut\.", r".\1.shortcut."),
]
_UP_BLOCK_LAYER = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.")


def official_state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a diffusers `AutoencoderKLWan` state dict onto the official `Wan2.1_VAE.pth` names.
    Keys no rule knows are kept, so loading reports them as unexpected."""
    # diffusers groups the decoder's flat `upsamples` into up blocks of resnets and one upsampler.
    resnets_per_up_block = 1 + max(
        (int(match.group(2)) for key in state_dict if (match := _UP_BLOCK_LAYER.match(key)) and match.group(2)),
        default=-1,
    )

    def flatten_up_blocks(key: str) -> str:
        match = _UP_BLOCK_LAYER.match(key)
        if match is None:
            return key
        block = int(match.group(1))
        layer = int(match.group(2)) if match.group(2) is not None else resnets_per_up_block  # the upsampler
        return f"decoder.upsamples.{block * (resnets_per_up_block + 1) + layer}." + key[match.end() :]

    renamed = {}
    for key, value in state_dict.items():
        key = flatten_up_blocks(key)
        for pattern, replacement in _DIFFUSERS_RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed
