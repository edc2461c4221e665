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
from stages.base.dit import WAN_DIT_SIZES, WanDiT, WanDiTConfig
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig
from stages.pixels import to_model_range
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.weights import shipped_weights_path
from stages.world import caption, object_pixels, world_batch, world_clips

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

    def __post_init__(self) -> None:
        if self.speed_named_share is not None and not 0.0 <= self.speed_named_share <= 1.0:
            raise ValueError(f"speed_named_share={self.speed_named_share} must be in [0, 1], or null for every phrasing alike")


class FlowBatch(NamedTuple):
    latents: torch.Tensor  # (B, 16, T', h, w) normalised, x0
    text: torch.Tensor  # (B, text_len, text_dim)
    sigmas: torch.Tensor  # (B,)
    noise: torch.Tensor  # like latents
    weights: torch.Tensor  # (B, 1, T', h, w) loss weight of each latent element


def flow_matching_loss(dit: WanDiT, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted mean squared error of the DiT's velocity against ε − x0."""
    noisy, target = noisy_sample_and_target(batch.latents, batch.noise, batch.sigmas)
    velocity = dit(noisy, batch.sigmas * TRAINING_TIMESTEPS, batch.text)
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


@torch.no_grad()
def encode_world(config: DitTrainingConfig, out_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips, 16, T', h, w) normalised latents of the run's world clips and (clips, 1, T', h, w)
    their object masks (`latent_object_masks`), from `latents.pt` in `out_dir` when an earlier
    invocation made it."""
    path = out_dir / LATENTS_NAME
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if isinstance(cached, dict) and cached["latents"].shape[0] == config.clips:
            return cached["latents"], cached["object_masks"]
        log.info("%s does not hold the latents and masks of %d clips: encoding again", path, config.clips)
    vae = WanVAE.from_pretrained(shipped_weights_path(config.vae_weights), config.vae)
    torch.set_num_threads(config.training.threads)
    chunks, masks = [], []
    for index in tqdm(range(0, config.clips, ENCODE_BATCH), desc="encoding world clips"):
        count = min(ENCODE_BATCH, config.clips - index)
        frames, _ = world_batch(index, config.training.seed, count, config.num_frames, config.frame_size,
                                config.two_object_share)
        chunks.append(vae.encode(to_model_range(torch.from_numpy(frames)).permute(0, 4, 1, 2, 3)))
        masks.append(latent_object_masks(frames))
    cached = {"latents": torch.cat(chunks), "object_masks": torch.cat(masks)}
    buffer = io.BytesIO()
    torch.save(cached, buffer)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)
    return cached["latents"], cached["object_masks"]


def training_batches(config: DitTrainingConfig, latents: torch.Tensor, object_masks: torch.Tensor,
                     text_encoder: TextEncoder):
    """batches(step) for `stages.training.train`, a function of the step and the seed alone."""
    descriptions = [clip for index in range(0, config.clips, ENCODE_BATCH)
                    for clip in world_clips(index, config.training.seed, min(ENCODE_BATCH, config.clips - index),
                                            config.num_frames, config.two_object_share)]

    def batches(step: int) -> FlowBatch:
        rng = np.random.default_rng([config.training.seed, step, 11])
        chosen = rng.integers(0, config.clips, config.training.batch_size)
        prompts = ["" if rng.random() < config.caption_dropout
                   else caption(descriptions[index], rng, "train", made_up_share=config.made_up_share,
                                speed_named_share=config.speed_named_share)
                   for index in chosen]
        text, _ = text_encoder.encode(prompts)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = latents[torch.from_numpy(chosen)]
        weights = 1.0 + (config.object_weight - 1.0) * object_masks[torch.from_numpy(chosen)].float()
        sigmas = sample_training_sigmas(len(chosen), config.shift, generator)
        return FlowBatch(x0, text, sigmas, torch.randn(x0.shape, generator=generator), weights)

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
    except ValueError as error:
        print(f"error: {error}")
        return 2
    weights = train(dit, flow_matching_loss, training_batches(config, latents, object_masks, text_encoder), config.training,
                    arguments.out, WEIGHTS_NAME)
    data = f"{config.clips} procedural world clips (stages/world.py), captions in the train phrasings"
    write_record(arguments.out, "dit", argv, data, config, dit, started, weights, arguments.init or "")
    print(f"wrote {weights}")
    return 0
