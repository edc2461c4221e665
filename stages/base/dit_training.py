"""Training the tiny DiT on the procedural world with the flow-matching objective: `train_stage.py dit`.

    python train_stage.py dit --steps 3000
    python train_stage.py dit clips=3000 dit.num_layers=6

It needs the trained VAE and text encoder (`train_stage.py vae`, `train_stage.py text_encoder`; by
default their shipped weights). First `clips` world clips of the cascade's size (17 frames, 128²)
are encoded once by the frozen VAE into normalised latents (B, 16, 5, 16, 16) and cached in the run
folder (`latents.pt`), so that a resumed run does not encode them again. Each step then draws a
batch of latents, a fresh caption of each clip in one of the world's `train` phrasings (English or
Chinese, some with made-up words put in), encodes the captions with the frozen text encoder, replaces a share `caption_dropout` of
them by the empty prompt (what classifier-free guidance contrasts with), draws noise levels from
the shifted schedule of flows/ and regresses the DiT's velocity on ε − x0 (mean squared error).
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from flows.training import noisy_sample_and_target, sample_training_sigmas
from stages.base.dit import WAN_DIT_SIZES, WanDiT, WanDiTConfig
from stages.base.text_encoder import TEXT_ENCODER_SIZES, TextEncoder, TextEncoderConfig
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig
from stages.pixels import to_model_range
from stages.training import TrainingConfig, config_from_overrides, final_losses, train, write_record
from stages.weights import shipped_weights_path
from stages.world import caption, world_batch, world_clips

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
        default_factory=lambda: TrainingConfig(batch_size=32, learning_rate=5e-4, warmup_steps=100, threads=2)
    )
    clips: int = 1600  # world clips encoded once and trained on
    num_frames: int = 17
    frame_size: int = 128
    shift: float = 3.0  # of the training noise levels; the tiny config samples with the same shift
    caption_dropout: float = 0.1
    made_up_share: float = 0.3  # of captions with made-up words put in, as the text encoder was trained
    two_object_share: float = 0.2


class FlowBatch(NamedTuple):
    latents: torch.Tensor  # (B, 16, T', h, w) normalised, x0
    text: torch.Tensor  # (B, text_len, text_dim)
    sigmas: torch.Tensor  # (B,)
    noise: torch.Tensor  # like latents


def flow_matching_loss(dit: WanDiT, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, float]]:
    noisy, target = noisy_sample_and_target(batch.latents, batch.noise, batch.sigmas)
    velocity = dit(noisy, batch.sigmas * TRAINING_TIMESTEPS, batch.text)
    loss = (velocity.float() - target).square().mean()
    return loss, {}


@torch.no_grad()
def encode_world(config: DitTrainingConfig, out_dir: Path) -> torch.Tensor:
    """(clips, 16, T', h, w) normalised latents of the run's world clips, from `latents.pt` in
    `out_dir` when an earlier invocation made it."""
    path = out_dir / LATENTS_NAME
    if path.is_file():
        latents = torch.load(path, weights_only=True)
        if latents.shape[0] == config.clips:
            return latents
        log.info("%s holds %d clips, the config asks for %d: encoding again", path, latents.shape[0], config.clips)
    vae = WanVAE.from_pretrained(shipped_weights_path(config.vae_weights), config.vae)
    torch.set_num_threads(config.training.threads)
    chunks = []
    for index in tqdm(range(0, config.clips, ENCODE_BATCH), desc="encoding world clips"):
        count = min(ENCODE_BATCH, config.clips - index)
        frames, _ = world_batch(index, config.training.seed, count, config.num_frames, config.frame_size,
                                config.two_object_share)
        chunks.append(vae.encode(to_model_range(torch.from_numpy(frames)).permute(0, 4, 1, 2, 3)))
    latents = torch.cat(chunks)
    buffer = io.BytesIO()
    torch.save(latents, buffer)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)
    return latents


def training_batches(config: DitTrainingConfig, latents: torch.Tensor, text_encoder: TextEncoder):
    """batches(step) for `stages.training.train`, a function of the step and the seed alone."""
    descriptions = [clip for index in range(0, config.clips, ENCODE_BATCH)
                    for clip in world_clips(index, config.training.seed, min(ENCODE_BATCH, config.clips - index),
                                            config.num_frames, config.two_object_share)]

    def batches(step: int) -> FlowBatch:
        rng = np.random.default_rng([config.training.seed, step, 11])
        chosen = rng.integers(0, config.clips, config.training.batch_size)
        prompts = ["" if rng.random() < config.caption_dropout
                   else caption(descriptions[index], rng, "train", made_up_share=config.made_up_share)
                   for index in chosen]
        text, _ = text_encoder.encode(prompts)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        x0 = latents[torch.from_numpy(chosen)]
        sigmas = sample_training_sigmas(len(chosen), config.shift, generator)
        return FlowBatch(x0, text, sigmas, torch.randn(x0.shape, generator=generator))

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
        latents = encode_world(config, arguments.out)
    except ValueError as error:
        print(f"error: {error}")
        return 2
    weights = train(dit, flow_matching_loss, training_batches(config, latents, text_encoder), config.training,
                    arguments.out, WEIGHTS_NAME)
    record = {
        "command": " ".join(["python train_stage.py dit", *argv]),
        "data": f"{config.clips} procedural world clips (stages/world.py), captions in the train phrasings",
        "config": asdict(config),
        "init": arguments.init or "",
        "parameters": sum(parameter.numel() for parameter in dit.parameters()),
        "wall_seconds_of_this_invocation": round(time.time() - started, 1),
        "final_losses": final_losses(arguments.out),
        "weights": str(weights),
    }
    write_record(arguments.out, record)
    print(f"wrote {weights}")
    return 0
