"""Training the wavelet upsampler: its losses, its batches and the `train_stage.py ssr` command.

    python train_stage.py ssr --scale 2 --steps 2000
    python train_stage.py ssr --scale 4 --init weights/ssr/upsampler_x2.safetensors
    python train_stage.py ssr --videos /my/videos upsampler.channels=48 training.learning_rate=1e-4

A batch is B short clips. The low-resolution input of a clip is its high-resolution frames' wavelet
low band divided by the low-band gain, level after level; for the haar wavelet that is exactly the
2x2 area (box) downsample, so the true detail bands of every level are the exact targets of what
each level predicts. The clip's frames go through the upsampler in order, as they do in the stage.

Losses:
- per-band wavelet L1: the mean absolute error of each predicted detail band (LH, HL, HH) against
  the true band, averaged over levels and frames, summed over the three bands;
- temporal consistency: the change of the output's spatial gradients from one frame to the next
  should equal that of the ground truth (L1), which penalises detail that flickers while leaving
  detail that moves with the content alone.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from stages.pixels import to_model_range
from stages.ssr.upsampler import SUPPORTED_SCALES, WaveletUpsampler, WaveletUpsamplerConfig
from stages.ssr.wavelet import LOW_BAND_GAIN, dwt2
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.training_data import WorldSource, clip_batch, clip_source
from stages.weights import load_into, read_state_dict

BAND_NAMES = ("LH", "HL", "HH")
CONFIG_NAME = "config.yaml"


@dataclass
class SsrTrainingConfig:
    upsampler: WaveletUpsamplerConfig = field(default_factory=WaveletUpsamplerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    clip_frames: int = 4  # frames per training clip, processed in order like the stage does
    crop_size: int = 64  # side of the high-resolution training crops, in pixels
    max_motion: float = 8.0  # synthetic clips: pixels a point moves per frame at most (high resolution)
    temporal_weight: float = 0.5  # weight of the temporal-consistency loss against the band L1
    # with --world: high-resolution frames of the world at the tiny cascade's ×2 output size
    world: WorldSource = field(default_factory=lambda: WorldSource(frame_size=256, time_step=1.0))


# ---------------------------------------------------------------------------------------------------
# Degradation and losses


def wavelet_downsample(frames: torch.Tensor, wavelet: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, H/2, W/2): the low band over the low-band gain. For haar this equals
    the 2x2 area average."""
    return dwt2(frames, wavelet)[:, :, 0] / LOW_BAND_GAIN


def make_pairs(clips: np.ndarray, config: WaveletUpsamplerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips (B, T, S, S, 3) -> (low resolution (T, B, 3, S/scale, S/scale), high resolution
    (T, B, 3, S, S)), both in [-1, 1], time first as the upsampler takes them."""
    high = to_model_range(torch.from_numpy(clips)).permute(1, 0, 4, 2, 3)  # (T, B, 3, S, S)
    count, batch = high.shape[:2]
    low = high.flatten(0, 1)
    for _ in range(SUPPORTED_SCALES[config.scale]):
        low = wavelet_downsample(low, config.wavelet)
    return low.unflatten(0, (count, batch)).contiguous(), high.contiguous()


def true_detail_bands(high: torch.Tensor, levels: int, wavelet: str) -> list[torch.Tensor]:
    """The detail bands each level should predict for a frame (B, 3, H, W), coarsest level first:
    one (B, 3, 3, h, w) tensor per level."""
    targets = []
    image = high
    for _ in range(levels):
        bands = dwt2(image, wavelet)  # (B, 3, 4, h, w)
        targets.append(bands[:, :, 1:])
        image = bands[:, :, 0] / LOW_BAND_GAIN
    return targets[::-1]


def spatial_gradients(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along W and H of (..., H, W)."""
    return frames[..., :, 1:] - frames[..., :, :-1], frames[..., 1:, :] - frames[..., :-1, :]


def temporal_consistency_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 between the frame-to-frame changes of the spatial gradients of outputs and targets,
    both (T, B, 3, H, W) with T >= 2."""
    total = outputs.new_zeros(())
    for output_gradient, target_gradient in zip(spatial_gradients(outputs), spatial_gradients(targets)):
        output_change = output_gradient[1:] - output_gradient[:-1]
        target_change = target_gradient[1:] - target_gradient[:-1]
        total = total + (output_change - target_change).abs().mean()
    return total / 2


def upsampler_loss(
    upsampler: WaveletUpsampler, batch: tuple[torch.Tensor, torch.Tensor], temporal_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of a batch (low (T, B, 3, h, w), high (T, B, 3, H, W)) and its parts."""
    low, high = batch
    levels = len(upsampler.levels)
    band_errors = []  # one (3,) tensor per frame and level: the mean |error| of LH, HL, HH
    outputs = []
    previous = None
    for low_frame, high_frame in zip(low, high):
        output, previous = upsampler(low_frame, previous)
        for bands, target in zip(previous, true_detail_bands(high_frame, levels, upsampler.config.wavelet)):
            band_errors.append((bands[:, :, 1:] - target).abs().mean(dim=(0, 1, 3, 4)))
        outputs.append(output)
    per_band = torch.stack(band_errors).mean(dim=0)  # (3,)
    band_loss = per_band.sum()
    temporal = temporal_consistency_loss(torch.stack(outputs), high) if len(outputs) > 1 else band_loss.new_zeros(())
    loss = band_loss + temporal_weight * temporal
    parts = {f"l1_{name}": value for name, value in zip(BAND_NAMES, per_band.tolist())}
    parts["temporal"] = temporal.item()
    return loss, parts


# ---------------------------------------------------------------------------------------------------
# Starting points


def initialise_from(upsampler: WaveletUpsampler, path: str) -> None:
    """Loads weights of the same scale as they are; a x2 (one-level) file initialises every level
    of a x4 upsampler, since each level solves the same 2x problem at its own resolution."""
    state = read_state_dict(path)
    levels = len(upsampler.levels)
    if levels > 1 and state and all(key.startswith("levels.0.") for key in state):
        state = {
            key.replace("levels.0.", f"levels.{index}.", 1): value for index in range(levels) for key, value in state.items()
        }
    load_into(upsampler, state, path)


# ---------------------------------------------------------------------------------------------------
# The command


def _parse(argv: list[str]) -> tuple[argparse.Namespace, SsrTrainingConfig]:
    parser = argparse.ArgumentParser(
        prog="train_stage.py ssr",
        description="Trains the wavelet upsampler of the spatial super-resolution stage.",
        epilog="key=value overrides set any field of SsrTrainingConfig, e.g. upsampler.channels=48 "
        "training.batch_size=4 clip_frames=5 crop_size=96 temporal_weight=0.5",
    )
    parser.add_argument("--out", help="run folder: checkpoint, log, weights (default runs/ssr-x<scale>)")
    parser.add_argument("--steps", type=int, help="training steps (training.steps)")
    parser.add_argument("--scale", type=int, help="2 or 4 (upsampler.scale, default 2)")
    parser.add_argument("--videos", type=Path, help="train on crops of the videos in this folder instead of photos")
    parser.add_argument("--world", action="store_true", help="train on the procedural world (stages/world.py) instead of photos")
    parser.add_argument("--init", help="weights to start from (a x2 file initialises every level of a x4 model)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args(argv)

    config: SsrTrainingConfig = config_from_overrides(
        SsrTrainingConfig, arguments.overrides, {"upsampler.scale": arguments.scale, "training.steps": arguments.steps}
    )
    scale = config.upsampler.scale
    if scale not in SUPPORTED_SCALES:
        raise ValueError(f"--scale must be one of {sorted(SUPPORTED_SCALES)}, got {scale}")
    if config.crop_size < 2 * scale or config.crop_size % scale:
        raise ValueError(f"crop_size must be a multiple of the scale {scale} and at least {2 * scale}, got {config.crop_size}")
    if config.clip_frames < 1:
        raise ValueError(f"clip_frames must be >= 1, got {config.clip_frames}")
    return arguments, config


def _check_same_model(out_dir: Path, config: SsrTrainingConfig) -> None:
    """A run folder holds one model: resuming with another upsampler config is an error."""
    saved_path = out_dir / CONFIG_NAME
    wanted = OmegaConf.structured(config.upsampler)
    if saved_path.exists():
        saved = OmegaConf.merge(OmegaConf.structured(WaveletUpsamplerConfig), OmegaConf.load(saved_path).upsampler)
        if saved != wanted:
            raise ValueError(
                f"{out_dir} holds a run of another upsampler ({OmegaConf.to_container(saved)}), not "
                f"{OmegaConf.to_container(wanted)}: pass another --out or delete that folder"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))


def main(argv: list[str]) -> int:
    try:
        arguments, config = _parse(argv)
        out_dir = Path(arguments.out or f"runs/ssr-x{config.upsampler.scale}")
        _check_same_model(out_dir, config)
        torch.manual_seed(config.training.seed)  # the initial weights, too, follow from the seed
        upsampler = WaveletUpsampler(config.upsampler)
        if arguments.init:
            initialise_from(upsampler, arguments.init)
        videos: Optional[Path] = arguments.videos
        if videos is not None and not videos.is_dir():
            raise ValueError(f"--videos folder not found: {videos}")
    except ValueError as error:
        print(f"error: {error}")
        return 2

    def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        clips = clip_batch(
            step, config.training.seed, config.training.batch_size, config.clip_frames, config.crop_size,
            videos=videos, max_motion=config.max_motion, world=config.world if arguments.world else None,
        )
        return make_pairs(clips, config.upsampler)

    started = time.time()
    weights = train(
        upsampler,
        lambda model, batch: upsampler_loss(model, batch, config.temporal_weight),
        batches,
        config.training,
        out_dir,
        f"upsampler_x{config.upsampler.scale}.safetensors",
    )
    data = clip_source(videos, arguments.world)
    write_record(out_dir, "ssr", argv, data, config, upsampler, started, weights, arguments.init or "")
    return 0
