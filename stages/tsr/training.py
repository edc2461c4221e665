"""Training the learned frame interpolator: its loss, its batches and the `train_stage.py tsr` command.

    python train_stage.py tsr --steps 2000
    python train_stage.py tsr --videos /my/videos --out runs/tsr-mine
    python train_stage.py tsr interpolator.widths=[64,48,32] training.learning_rate=1e-4 crop_size=96

A training example is a triplet cut from a clip of 7 frames: frames 0 and 6 are the inputs and frame
i (1 ≤ i ≤ 5) the truth at t = i/6, so one model learns t = 1/2, 1/3, 2/3, 1/6 and 5/6. Clips are
synthetic camera moves over the training photos (`stages.training_data`) or crops of the user's
videos; half of them are played backwards.

The loss:
- reconstruction: Charbonnier distance of the interpolated frame to the true one;
- warping consistency: each input warped by its predicted intermediate flow should already look like
  the true frame (Charbonnier again), after every flow block, so that the flows themselves are
  supervised at every scale and not only through the fusion.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch

from stages.pixels import to_model_range
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.training_data import WorldSource, clip_batch, clip_source, video_files
from stages.tsr.learned import LearnedInterpolator, LearnedInterpolatorConfig
from stages.tsr.warp import backward_warp
from stages.weights import load_into, read_state_dict

CLIP_FRAMES = 7  # inputs at frames 0 and 6, truth at one of the five frames between
WEIGHTS_NAME = "interpolator.safetensors"
CHARBONNIER_EPSILON = 1e-3


@dataclass
class TsrTrainingConfig:
    interpolator: LearnedInterpolatorConfig = field(default_factory=LearnedInterpolatorConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    crop_size: int = 128  # side of the training frames, in pixels
    max_motion: float = 4.0  # synthetic clips: pixels a point moves per frame step at most (6 steps per pair)
    warp_weight: float = 0.5  # weight of the warping-consistency loss against the reconstruction
    # with --world: the tiny cascade's frames (128²), the 7 frames of a clip 1/6 of a world frame
    # apart, so the inputs (frames 0 and 6) are two consecutive frames of a base clip
    world: WorldSource = field(default_factory=lambda: WorldSource(frame_size=128, time_step=1 / 6))


class Triplets(NamedTuple):
    frame0: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    frame1: torch.Tensor
    truth: torch.Tensor  # the true frame at `times`
    times: torch.Tensor  # (B,)


def make_triplets(clips: np.ndarray, rng: np.random.Generator) -> Triplets:
    """uint8 clips (B, 7, S, S, 3) → triplets: frames 0 and 6 (either way round) and frame i at
    t = i/6, with i drawn from 1 … 5 for every clip."""
    batch, count = clips.shape[:2]
    frames = to_model_range(torch.from_numpy(clips)).permute(0, 1, 4, 2, 3)  # (B, T, 3, S, S)
    reverse = rng.random(batch) < 0.5
    frames = torch.where(torch.from_numpy(reverse).view(-1, 1, 1, 1, 1), frames.flip(1), frames)
    middle = torch.from_numpy(rng.integers(1, count - 1, size=batch))
    truth = frames[torch.arange(batch), middle]
    return Triplets(frames[:, 0].contiguous(), frames[:, -1].contiguous(), truth, middle.float() / (count - 1))


def charbonnier(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of sqrt(difference² + ε²): L1-like, but smooth at zero."""
    return torch.sqrt((prediction - target).square() + CHARBONNIER_EPSILON**2).mean()


def interpolation_loss(
    model: LearnedInterpolator, batch: Triplets, warp_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch of triplets and its parts."""
    result = model.interpolate(batch.frame0, batch.frame1, batch.times)
    reconstruction = charbonnier(result.frame, batch.truth)
    warp_errors = [
        0.5 * (charbonnier(backward_warp(batch.frame0, flow_t0), batch.truth)
               + charbonnier(backward_warp(batch.frame1, flow_t1), batch.truth))
        for flow_t0, flow_t1 in zip(result.flows_t0, result.flows_t1)
    ]
    warping = torch.stack(warp_errors).mean()
    loss = reconstruction + warp_weight * warping
    return loss, {"reconstruction": reconstruction.item(), "warping": warping.item()}


# ---------------------------------------------------------------------------------------------------
# The command


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, TsrTrainingConfig]:
    parser = argparse.ArgumentParser(
        prog="train_stage.py tsr",
        description="Trains the learned frame interpolator of the temporal super-resolution stage.",
        epilog="key=value overrides set any field of TsrTrainingConfig, e.g. interpolator.widths=[64,48,32] "
        "training.batch_size=4 crop_size=96 max_motion=6 warp_weight=0.25",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/tsr"), help="run folder: checkpoint, log, weights")
    parser.add_argument("--steps", type=int, help="training steps (training.steps)")
    parser.add_argument("--videos", type=Path, help="train on crops of the videos in this folder instead of photos")
    parser.add_argument("--world", action="store_true", help="train on the procedural world (stages/world.py) instead of photos")
    parser.add_argument("--init", help="weights to start from (e.g. the shipped ones, to tune them)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args(argv)

    config: TsrTrainingConfig = config_from_overrides(TsrTrainingConfig, arguments.overrides, {"training.steps": arguments.steps})
    if config.crop_size < 16:
        raise ValueError(f"crop_size must be at least 16 pixels, got {config.crop_size}")
    if config.max_motion < 0 or config.warp_weight < 0:
        raise ValueError(f"max_motion and warp_weight must be >= 0, got {config.max_motion} and {config.warp_weight}")
    if arguments.videos is not None:
        video_files(arguments.videos)  # raises ValueError naming a missing or empty folder
    return arguments, config


def training_batches(config: TsrTrainingConfig, videos: Optional[Path], world: bool = False):
    """batches(step) for `stages.training.train`: a function of the step and the seed alone."""

    def batches(step: int) -> Triplets:
        clips = clip_batch(
            step, config.training.seed, config.training.batch_size, CLIP_FRAMES, config.crop_size,
            videos=videos, max_motion=config.max_motion, world=config.world if world else None,
        )
        # A stream of its own (clip_batch seeds with [seed, step, split]): which frame, which direction.
        return make_triplets(clips, np.random.default_rng([config.training.seed, step, CLIP_FRAMES]))

    return batches


def main(argv: list[str]) -> int:
    try:
        arguments, config = parse_arguments(argv)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    model = LearnedInterpolator(config.interpolator)
    if arguments.init:
        load_into(model, read_state_dict(arguments.init), arguments.init)
    started = time.time()
    weights = train(
        model,
        lambda model, batch: interpolation_loss(model, batch, config.warp_weight),
        training_batches(config, arguments.videos, arguments.world),
        config.training,
        arguments.out,
        WEIGHTS_NAME,
    )
    data = clip_source(arguments.videos, arguments.world)
    write_record(arguments.out, "tsr", argv, data, config, model, started, weights, arguments.init or "")
    print(f"wrote {weights}")
    return 0
