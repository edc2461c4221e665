"""Training the tiny DiT on the procedural world with the flow-matching objective: `train_stage.py dit`.

    python train_stage.py dit --out runs/dit
    python train_stage.py dit clips=3000 dit.num_layers=6

It needs the trained VAE and text encoder (`train_stage.py vae`, `train_stage.py text_encoder`; by
default their shipped weights). First `clips` world clips of the cascade's size (17 frames, 128²)
are encoded once by the frozen VAE into normalised latents (B, 16, 5, 16, 16) and cached in the run
folder (`latents.pt`), so that a resumed run does not encode them again. Each step then draws a
batch of latents, a fresh caption of each clip in one of the world's `train` phrasings (English or
Chinese, some with made-up words put in; `speed_named_share` sets how many name the speed), encodes
the captions with the frozen text encoder, replaces a share `caption_dropout` of them by the empty
prompt (what classifier-free guidance contrasts with), draws noise levels from the shifted schedule
of flows/ and regresses the DiT's velocity on ε − x0 (mean squared error).

The world's objects cover a few percent of a frame, and where they are in each frame is all a
prompt's direction decides; with a plain mean the loss is mostly background, and 5300 steps learnt
the colour but not the direction (docs/eval_world.md). So the squared error of the latent elements
that cover an object (its saturated pixels, pooled onto the latent grid and grown by one latent
pixel) weighs `object_weight`, the rest 1, normalised to a mean weight of 1.

Overview windows (flows/windows.py; `overview_share` > 0): a long clip is sampled with one more
window, its latent frames spread from the first to the last and given their places in the clip as
rotary positions, and a DiT must be trained on such windows to make use of it. So `long_clips` world
clips of each of `long_frames` frames (objects at the speeds that stay in view that long: the slow
one) are encoded whole once (`long_latents_{frames}.pt`), and a share `overview_share` of the steps
trains on their `overview_frames` at those positions instead of on the 17-frame clips
(docs/long_video.md).

A step is compute-bound on a CPU, so the default recipe buys steps: small batches (8 clips),
torch.compile (about 1.3 times faster on 2 cores; `training.compile=false` where no C++ compiler
is at hand), and the written weights are the moving average of the weights over about the last
1000 steps (`training.average_decay`), meant to smooth out the noise of small batches (it did
little for the shipped run: docs/eval_world.md, "The DiT from scratch in one run").
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from flows.training import noisy_sample_and_target, sample_training_sigmas
from flows.windows import overview_frames
from stages.base.dit import WAN_DIT_SIZES, WanDiT, WanDiTConfig
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig
from stages.pixels import to_model_range
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.weights import shipped_weights_path
from stages.world import (
    DIRECTIONS, SPEEDS, caption, frames_in_view, object_pixels, speeds_in_view, world_batch, world_clips,
)

log = logging.getLogger(__name__)

WEIGHTS_NAME = "dit.safetensors"
LATENTS_NAME = "latents.pt"
TRAINING_TIMESTEPS = 1000  # the DiT's timestep is 1000·σ
ENCODE_BATCH = 8


@dataclass
class DitTrainingConfig:
    dit: WanDiTConfig = field(default_factory=lambda: replace(WAN_DIT_SIZES["tiny"]))
    text_encoder: TextEncoderConfig = field(default_factory=lambda: replace(TEXT_ENCODER_SIZES["tiny"]))
    text_encoder_weights: str = "weights/base/text_encoder.safetensors"
    vae: WanVAEConfig = field(default_factory=lambda: replace(WAN_VAE_SIZES["tiny"]))
    vae_weights: str = "weights/base/vae.safetensors"
    training: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(
            steps=26000, batch_size=8, learning_rate=1e-3, warmup_steps=100, checkpoint_every=500, threads=2,
            average_decay=0.999, compile=True,
        )
    )  # 1 h 51 min on 2 cores with the encoding: the shipped weights (docs/eval_world.md, run 8)
    clips: int = 1000  # world clips encoded once and trained on
    num_frames: int = 17
    frame_size: int = 128
    # of the training noise levels, as the tiny config samples (the shipped weights' runs 3-4 trained
    # at 2, which from scratch did not learn the direction in 7000 steps: docs/eval_world.md)
    shift: float = 3.0
    caption_dropout: float = 0.1
    made_up_share: float = 0.3  # of captions with made-up words put in, as the text encoder was trained
    # of objects captioned in a phrasing that names their speed (None: every train phrasing alike,
    # about 45% of them naming it)
    speed_named_share: float | None = None
    two_object_share: float = 0.2
    object_weight: float = 25.0  # loss weight of the latent elements an object covers (1 elsewhere)
    overview_share: float = 0.0  # of the steps that train overview windows of long clips (0: none)
    long_clips: int = 240  # long world clips encoded for them, of each length in long_frames
    # their lengths; an overview step draws one entry of the list, so a length listed twice is drawn
    # twice as often (the shipped overview DiT's [33, 49, 49]: docs/long_video.md)
    long_frames: list[int] = field(default_factory=lambda: [33, 49])

    def __post_init__(self) -> None:
        if self.speed_named_share is not None and not 0.0 <= self.speed_named_share <= 1.0:
            raise ValueError(f"speed_named_share={self.speed_named_share} must be in [0, 1], or null for every phrasing alike")
        if not 0.0 <= self.overview_share <= 1.0:
            raise ValueError(f"overview_share={self.overview_share} must be in [0, 1]")
        window = 1 + (self.num_frames - 1) // 4  # latent frames of a training clip
        longest = max(min(frames_in_view(speed, direction) for direction in DIRECTIONS) for speed in SPEEDS)
        for frames in self.long_frames:
            if frames <= self.num_frames or (frames - 1) % 4 or not speeds_in_view(frames):
                raise ValueError(f"long_frames {self.long_frames}: each must be 4·k + 1 frames, longer than "
                                 f"num_frames={self.num_frames} and at most {longest}, the longest the world keeps "
                                 f"an object of some speed in view")
            if (frames - 1) // 4 + 1 < window:
                raise ValueError(f"long_frames {self.long_frames} must hold at least {window} latent frames")


class FlowBatch(NamedTuple):
    latents: torch.Tensor  # (B, 16, T', h, w) normalised, x0
    text: torch.Tensor  # (B, text_len, text_dim)
    sigmas: torch.Tensor  # (B,)
    noise: torch.Tensor  # like latents
    weights: torch.Tensor  # (B, 1, T', h, w) loss weight of each latent element
    frame_positions: list[int] | None = None  # the latent frames' places in their clip (None: 0 … T' − 1)


def flow_matching_loss(dit: WanDiT, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted mean squared error of the DiT's velocity against ε − x0."""
    noisy, target = noisy_sample_and_target(batch.latents, batch.noise, batch.sigmas)
    velocity = dit(noisy, batch.sigmas * TRAINING_TIMESTEPS, batch.text, frame_positions=batch.frame_positions)
    squared_error = (velocity.float() - target).square()  # (B, 16, T', h, w)
    weights = batch.weights.expand_as(squared_error)
    return (weights * squared_error).sum() / weights.sum(), {}


def latent_object_masks(frames: np.ndarray, time_stride: int = 4, space_stride: int = 8) -> torch.Tensor:
    """frames (B, T, H, W, 3) uint8 -> (B, 1, T', H/8, W/8) bool: the latent elements whose pixels
    hold an object, on the grid of Wan's causal VAE (latent frame 0 is frame 0, each later one the
    next 4 frames), grown by one latent pixel so that an object's edge counts too."""
    pixels = torch.from_numpy(object_pixels(frames)).float()  # (B, T, H, W)
    batch, num_frames, height, width = pixels.shape
    later = pixels[:, 1:].reshape(batch, (num_frames - 1) // time_stride, time_stride, height, width).amax(2)
    per_latent_frame = torch.cat([pixels[:, :1], later], 1)  # (B, T', H, W)
    masks = F.max_pool2d(per_latent_frame, space_stride)  # (B, T', h, w)
    masks = F.max_pool2d(masks, 3, stride=1, padding=1)
    return masks[:, None].bool()


def world_descriptions(count: int, seed: int, num_frames: int, two_object_share: float) -> list:
    """The descriptions of the `count` world clips a run encodes, in order (`world_clips` in batches of
    ENCODE_BATCH; a clip longer than 17 frames moves its objects at the speeds that stay in view)."""
    speeds = speeds_in_view(num_frames)
    return [clip for index in range(0, count, ENCODE_BATCH)
            for clip in world_clips(index, seed, min(ENCODE_BATCH, count - index), num_frames, two_object_share, speeds)]


@torch.no_grad()
def encode_world(config: DitTrainingConfig, out_dir: Path, count: int | None = None, num_frames: int | None = None,
                 name: str = LATENTS_NAME) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, 16, T', h, w) normalised latents of the run's world clips and (clips, 1, T', h, w)
    their object masks (`latent_object_masks`), from `name` in `out_dir` when an earlier invocation
    made it. By default the `clips` clips of `num_frames`; the long clips pass their own."""
    count, num_frames = count or config.clips, num_frames or config.num_frames
    seed = clip_seed(config, num_frames)
    path = out_dir / name
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if isinstance(cached, dict) and (cached["latents"].shape[0], cached["latents"].shape[2]) == (count, 1 + (num_frames - 1) // 4):
            return cached["latents"], cached["object_masks"]
        log.info("%s does not hold the latents and masks of %d clips of %d frames: encoding again", path, count, num_frames)
    vae = WanVAE.from_pretrained(shipped_weights_path(config.vae_weights), config.vae)
    torch.set_num_threads(config.training.threads)
    chunks, masks = [], []
    for index in tqdm(range(0, count, ENCODE_BATCH), desc=f"encoding world clips of {num_frames} frames"):
        frames, _ = world_batch(index, seed, min(ENCODE_BATCH, count - index), num_frames, config.frame_size,
                                config.two_object_share, speeds_in_view(num_frames))
        chunks.append(vae.encode(to_model_range(torch.from_numpy(frames)).permute(0, 4, 1, 2, 3)))
        masks.append(latent_object_masks(frames))
    cached = {"latents": torch.cat(chunks), "object_masks": torch.cat(masks)}
    buffer = io.BytesIO()
    torch.save(cached, buffer)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)
    return cached["latents"], cached["object_masks"]


def clip_seed(config: DitTrainingConfig, num_frames: int) -> int:
    """The training clips' seed, and another for each length of long clips (their own draws)."""
    return config.training.seed if num_frames == config.num_frames else config.training.seed + 1000 * num_frames


def encode_long_world(config: DitTrainingConfig, out_dir: Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{frames: (latents, object masks)} of the `long_clips` clips of each of `long_frames`."""
    return {frames: encode_world(config, out_dir, config.long_clips, frames, f"long_latents_{frames}.pt")
            for frames in dict.fromkeys(config.long_frames)}


def training_batches(config: DitTrainingConfig, latents: torch.Tensor, object_masks: torch.Tensor,
                     text_encoder: TextEncoder, long: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None):
    """batches(step) for `stages.training.train`, a function of the step and the seed alone. With
    `long` clips (`encode_long_world`), a share `overview_share` of the steps are overview windows
    of them: their `overview_frames`, at those places as the frames' positions."""
    long = long or {}
    window = latents.shape[2]
    descriptions = {config.num_frames: world_descriptions(config.clips, config.training.seed, config.num_frames,
                                                          config.two_object_share)}
    for frames in long:
        descriptions[frames] = world_descriptions(config.long_clips, clip_seed(config, frames), frames,
                                                  config.two_object_share)

    def batches(step: int) -> FlowBatch:
        rng = np.random.default_rng([config.training.seed, step, 11])
        # drawn apart from rng, so that a run without overview windows draws what it always did
        overview = bool(long) and np.random.default_rng([config.training.seed, step, 13]).random() < config.overview_share
        if overview:
            frames = config.long_frames[int(rng.integers(len(config.long_frames)))]
            clip_latents, clip_masks = long[frames]
            positions = overview_frames(clip_latents.shape[2], window)
        else:
            frames, clip_latents, clip_masks, positions = config.num_frames, latents, object_masks, None
        chosen = rng.integers(0, clip_latents.shape[0], config.training.batch_size)
        prompts = ["" if rng.random() < config.caption_dropout
                   else caption(descriptions[frames][index], rng, "train", made_up_share=config.made_up_share,
                                speed_named_share=config.speed_named_share)
                   for index in chosen]
        text, _ = text_encoder.encode(prompts)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = clip_latents[torch.from_numpy(chosen)]
        weights = 1.0 + (config.object_weight - 1.0) * clip_masks[torch.from_numpy(chosen)].float()
        if positions is not None:  # (B, ·, T'_long, h, w) -> the overview's frames
            x0, weights = x0[:, :, positions], weights[:, :, positions]
        sigmas = sample_training_sigmas(len(chosen), config.shift, generator)
        return FlowBatch(x0, text, sigmas, torch.randn(x0.shape, generator=generator), weights, positions)

    return batches


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train_stage.py dit",
        description="Trains the tiny DiT on the procedural world with the flow-matching objective.",
        epilog="key=value overrides set any field of DitTrainingConfig, e.g. clips=3000 training.batch_size=16",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/dit"), help="run folder (default runs/dit)")
    parser.add_argument("--steps", type=int, help="training steps (training.steps)")
    parser.add_argument("--init", help="DiT weights to start from (e.g. the shipped ones, to train them further)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args(argv)
    try:
        config = config_from_overrides(DitTrainingConfig, arguments.overrides, {"training.steps": arguments.steps})
        if config.dit.text_dim != config.text_encoder.d_model:
            raise ValueError(f"dit.text_dim={config.dit.text_dim} must equal text_encoder.d_model={config.text_encoder.d_model}")
    except ValueError as error:
        print(f"error: {error}")
        return 2
    try:  # WeightsError (a ValueError) names a missing, corrupt or mis-shaped file
        text_encoder = TextEncoder.from_pretrained(shipped_weights_path(config.text_encoder_weights), config.text_encoder)
        dit = WanDiT.from_pretrained(arguments.init, config.dit) if arguments.init else WanDiT(config.dit)
        arguments.out.mkdir(parents=True, exist_ok=True)
        started = time.time()
        latents, object_masks = encode_world(config, arguments.out)
        long = encode_long_world(config, arguments.out) if config.overview_share > 0 else {}
    except ValueError as error:
        print(f"error: {error}")
        return 2
    batches = training_batches(config, latents, object_masks, text_encoder, long)
    weights = train(dit, flow_matching_loss, batches, config.training, arguments.out, WEIGHTS_NAME)
    data = f"{config.clips} procedural world clips (stages/world.py), captions in the train phrasings"
    if long:
        data += (f"; {config.long_clips} clips of each of {list(long)} frames for overview windows, "
                 f"drawn as listed in {config.long_frames}")
    write_record(arguments.out, "dit", argv, data, config, dit, started, weights, arguments.init or "")
    print(f"wrote {weights}")
    return 0
