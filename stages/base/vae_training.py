"""Training the tiny Wan VAE on the procedural world: its loss, its batches and `train_stage.py vae`.

    python train_stage.py vae --steps 800
    python train_stage.py vae vae.base_dim=16 crop_size=96 training.batch_size=2

The VAE keeps Wan's structure and compression (causal 3D convolutions, 4x time, 8x space, 16 latent
channels); only its widths are small. A training example is a world clip of `clip_frames` frames
(the first frame alone, then chunks of 4, as the encoder streams them) rendered at the cascade's
frame size and cropped to `crop_size` around its first object, so objects have the size they have
in the cascade and fill a good share of every crop.

The loss, per clip:
- reconstruction: L1 distance of the decoded frames to the input, decoding a sample of the
  posterior (so that the decoder tolerates the imprecise latents a DiT makes), with saturated
  pixels (the world's objects) weighted more;
- KL divergence of the posterior from N(0, 1), per latent element, weighted lightly: it keeps the
  latent scale in check without blurring the frames.

After training, the per-channel mean and std of the posterior means over `statistics_clips` whole
clips are measured and stored in the weights file's metadata; `WanVAE.from_pretrained` reads them,
so latents are normalised per channel as Wan's are.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.base.vae import WAN_VAE_SIZES, AttentionBlock, ResidualBlock, WanVAE, WanVAEConfig, latent_statistics_metadata
from stages.pixels import to_model_range
from stages.training import TrainingConfig, config_from_overrides, train, write_record
from stages.weights import write_safetensors
from stages.world import object_centre, world_batch

WEIGHTS_NAME = "vae.safetensors"
INITIAL_LOG_VARIANCE = -6.0  # posterior std e^-3 ≈ 0.05 at the start of training
INITIAL_BIAS_STD = 0.5  # of the first convolution's bias, as large as its output from frames in [-1, 1]


@dataclass
class VaeTrainingConfig:
    vae: WanVAEConfig = field(default_factory=lambda: replace(WAN_VAE_SIZES["tiny"]))
    training: TrainingConfig = field(default_factory=lambda: TrainingConfig(batch_size=4, learning_rate=3e-4, threads=2))
    frame_size: int = 128  # the world is rendered at the cascade's size ...
    crop_size: int = 48  # ... and cropped to this for training
    clip_frames: int = 17  # 1 + 4k: as long as the cascade's clips, so every chunk position is trained
    kl_weight: float = 1e-3
    # The world's objects are its saturated pixels, a few percent of a frame: they weigh this much
    # more in the reconstruction, so the VAE learns them as early as the backgrounds.
    saturated_weight: float = 4.0
    statistics_clips: int = 64  # whole clips (frame_size², 17 frames) the latent statistics come from


def initialise_for_training(vae: WanVAE) -> None:
    """A start from which the Wan VAE trains in hundreds of steps instead of many thousands.

    With PyTorch's default start (and diffusers' AutoencoderKLWan alike) the decoder's output hardly
    depends on its input for hundreds of steps: biases accumulate through the deep residual stacks,
    and the RMSNorm before each head, which keeps only the direction of every pixel's feature
    vector, then sees almost the same direction whatever the input. Here every convolution is drawn
    with unit gain and no bias, and the last convolution of every residual block and the output
    projection of every attention block are zero, so each block starts as its shortcut and the
    input's features reach the heads undimmed (an attention block that starts by adding a random
    mix of all pixels to each one washes out where things are: with it, colours were still not
    learnt after 300 steps on single frames; without it, after 150). One bias is kept,
    the first convolution's: without it the whole encoder would be positively homogeneous (RMSNorm
    ignores scale), so a grey frame and the same frame at half the brightness would get the same
    latents. The posterior's log-variance starts at INITIAL_LOG_VARIANCE, so that early samples
    are not drowned in noise.
    """
    for module in vae.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(vae.encoder.conv1.bias, std=INITIAL_BIAS_STD)
    for module in vae.modules():
        if isinstance(module, ResidualBlock):
            nn.init.zeros_(module.residual[-1].weight)
        if isinstance(module, AttentionBlock):
            nn.init.zeros_(module.proj.weight)
    with torch.no_grad():
        vae.conv1.bias[vae.config.z_dim :] = INITIAL_LOG_VARIANCE


def saturation(frames: torch.Tensor) -> torch.Tensor:
    """HSV saturation (B, 1, T, H, W) in [0, 1] of frames (B, 3, T, H, W) in [-1, 1]."""
    rgb = (frames + 1.0) / 2.0
    high, low = rgb.amax(dim=1, keepdim=True), rgb.amin(dim=1, keepdim=True)
    return (high - low) / high.clamp_min(1e-3)


def vae_loss(vae: WanVAE, frames: torch.Tensor, kl_weight: float, saturated_weight: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """frames (B, 3, T, H, W) in [-1, 1] -> the training loss and its parts. Pixels weigh
    1 + saturated_weight·saturation in the reconstruction (normalised to a mean weight of 1)."""
    mu, log_variance = vae.posterior(frames)
    log_variance = log_variance.clamp(-30.0, 20.0)
    z = mu + torch.randn_like(mu) * (0.5 * log_variance).exp()
    decoded = torch.cat(list(vae.decode_chunks(z)), dim=2)
    weight = 1.0 + saturated_weight * saturation(frames)  # (B, 1, T, H, W)
    reconstruction = ((decoded - frames).abs() * weight).mean() / weight.mean()
    kl = 0.5 * (mu.square() + log_variance.exp() - 1.0 - log_variance).mean()
    return reconstruction + kl_weight * kl, {"reconstruction": reconstruction.item(), "kl": kl.item()}


def training_batches(config: VaeTrainingConfig):
    """batches(step) for `stages.training.train`: crops of world clips around their first object, a
    function of the step."""

    size, crop = config.frame_size, config.crop_size

    def batches(step: int) -> torch.Tensor:
        clips, descriptions = world_batch(step, config.training.seed, config.training.batch_size,
                                          config.clip_frames, size)
        rng = np.random.default_rng([config.training.seed, step, 5])
        crops = []
        for frames, description in zip(clips, descriptions):
            # centred near the first object halfway along its path: the objects, a few percent of a
            # frame, are what the VAE must learn most, and random crops would mostly miss them
            x, y = (value * size for value in object_centre(description.objects[0], (config.clip_frames - 1) / 2))
            left, top = (int(np.clip(round(centre - crop / 2 + rng.uniform(-crop / 4, crop / 4)), 0, size - crop))
                         for centre in (x, y))
            crops.append(frames[:, top : top + crop, left : left + crop])
        return to_model_range(torch.from_numpy(np.stack(crops))).permute(0, 4, 1, 2, 3).contiguous()  # (B, 3, T, S, S)

    return batches


@torch.no_grad()
def measure_latent_statistics(vae: WanVAE, config: VaeTrainingConfig, num_frames: int = 17) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of `statistics_clips` held-back world clips."""
    means = []
    for start in range(0, config.statistics_clips, 8):
        clips, _ = world_batch(10**6 + start, config.training.seed, min(8, config.statistics_clips - start),
                               num_frames, config.frame_size)
        mu, _ = vae.posterior(to_model_range(torch.from_numpy(clips)).permute(0, 4, 1, 2, 3))
        means.append(mu.float().transpose(0, 1).flatten(1))  # (z_dim, B·T'·h·w)
    values = torch.cat(means, dim=1)
    return values.mean(1).tolist(), values.std(1).tolist()


def _parse(argv: list[str]) -> tuple[argparse.Namespace, VaeTrainingConfig]:
    parser = argparse.ArgumentParser(
        prog="train_stage.py vae",
        description="Trains the tiny Wan VAE on clips of the procedural world.",
        epilog="key=value overrides set any field of VaeTrainingConfig, e.g. vae.base_dim=16 crop_size=96 kl_weight=1e-4",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/vae"), help="run folder (default runs/vae)")
    parser.add_argument("--steps", type=int, help="training steps (training.steps)")
    parser.add_argument("--init", help="VAE weights to start from (e.g. the shipped ones, to train them further)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args(argv)
    config = config_from_overrides(VaeTrainingConfig, arguments.overrides, {"training.steps": arguments.steps})
    if (config.clip_frames - 1) % 4 or config.clip_frames < 1:
        raise ValueError(f"clip_frames must be 1 + 4k (1, 5, 9, ...), got {config.clip_frames}")
    if config.crop_size % 8 or not 8 <= config.crop_size <= config.frame_size:
        raise ValueError(f"crop_size must be a multiple of 8 from 8 to frame_size={config.frame_size}, got {config.crop_size}")
    return arguments, config


def main(argv: list[str]) -> int:
    try:
        arguments, config = _parse(argv)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    try:
        vae = WanVAE.from_pretrained(arguments.init, config.vae) if arguments.init else WanVAE(config.vae)
    except ValueError as error:  # WeightsError: a missing, corrupt or mis-shaped file
        print(f"error: {error}")
        return 2
    if not arguments.init:
        initialise_for_training(vae)
    started = time.time()
    weights = train(vae, lambda model, batch: vae_loss(model, batch, config.kl_weight, config.saturated_weight), training_batches(config),
                     config.training, arguments.out, WEIGHTS_NAME)
    mean, std = measure_latent_statistics(vae, config)
    write_safetensors(weights, vae.state_dict(), latent_statistics_metadata(mean, std))
    write_record(arguments.out, "vae", argv, "procedural world clips (stages/world.py)", config, vae, started, weights,
                 arguments.init or "", latents_mean=mean, latents_std=std)
    print(f"wrote {weights}")
    return 0
