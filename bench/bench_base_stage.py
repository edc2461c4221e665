"""CPU benchmark: the base stage's sampling against diffusers' WanPipeline, same weights, prompt
embeddings, noise, steps, guidance and sampler, without and with TeaCache, and both with their
transformer blocks compiled by torch.compile. From the repository root:

    python bench/bench_base_stage.py [--height 256 --width 256 --frames 17] [--rounds 2] [--threads 1] [key=value ...]

The model: the tiny cascade's (configs/tiny.yaml, overridable): its trained Wan-architecture DiT,
held by our WanDiT and, converted to the diffusers names, by diffusers' WanTransformer3DModel; its
text encoder gives both the same prompt embeddings; its VAE decodes every video for the PSNR.
"Time per video" is sampling from the noise to the final latents (no text encoding, no decode):
ours is `BaseStage.denoise` (guidance pair batched into one DiT call), diffusers' is `WanPipeline`
with `prompt_embeds`, `negative_prompt_embeds`, `latents` and `output_type="latent"` (the pair as
two transformer calls) and its scheduler set to our schedule (the config's sampler: Euler ->
FlowMatchEulerDiscreteScheduler, unipc -> UniPCMultistepScheduler). After one warm-up video each,
the variants alternate for `--rounds` rounds; the table gives each one's median wall and process CPU
time, and as ratios the median over rounds of ours / diffusers within a round (on a shared machine
the CPU time with --threads 1 is the steadier number). "Compiled" is regional compilation on both
sides: ours `stages.base.compile` (WanDiT.compile_blocks), diffusers' `compile_repeated_blocks()`;
the warm-up video pays the compilation, the timed ones do not.

Peak memory: each variant in a fresh subprocess; after setup and one warm-up video it resets the
kernel's peak-RSS counter (5 into /proc/self/clear_refs) and reports VmHWM − VmRSS-before over one
video, with glibc's mmap threshold at 64 KiB so freed tensors leave RSS at once (as bench/bench_dit.py).

PSNR: the decoded uint8 frames of each video against those of our uncached one (the cached video's
distance from the uncached, and diffusers' video's from ours).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from bench.bench_dit import proc_status_kib  # noqa: E402
from bench.eval_world import psnr  # noqa: E402
from cascade.config import load_config  # noqa: E402
from cascade.payload import Request  # noqa: E402
from flows import flow_sigmas  # noqa: E402
from stages.base.dit import WanDiT, official_state_dict_from_diffusers  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.compiling import require_compiler  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402

PROMPT = "一个红色的球向右滚动"  # the tiny cascade's default prompt
SEED = 5
VARIANTS = ("ours", "ours + TeaCache", "diffusers", "ours, compiled", "diffusers, compiled")


def diffusers_transformer(dit: WanDiT) -> WanTransformer3DModel:
    """diffusers' Wan transformer holding `dit`'s weights."""
    config = dit.config
    model = WanTransformer3DModel(
        patch_size=tuple(config.patch_size), num_attention_heads=config.num_heads, attention_head_dim=config.head_dim,
        in_channels=config.in_dim, out_channels=config.out_dim, text_dim=config.text_dim, freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim, num_layers=config.num_layers, eps=config.eps,
    ).eval()
    official_to_diffusers = official_state_dict_from_diffusers({name: name for name in model.state_dict()})
    ours = dit.state_dict()
    model.load_state_dict({diffusers_name: ours[name] for name, diffusers_name in official_to_diffusers.items()})
    return model


class Setup:
    """The models and inputs every variant shares."""

    def __init__(self, arguments: argparse.Namespace):
        torch.set_num_threads(arguments.threads)
        overrides = [*arguments.overrides, f"video.height={arguments.height}", f"video.width={arguments.width}",
                     f"video.num_frames={arguments.frames}"]
        config = load_config(None, overrides)
        self.config = config.stages.base
        self.base = BaseStage(self.config)
        if self.base.warnings:
            raise SystemExit("; ".join(self.base.warnings))
        self.uncached = dataclasses.replace(self.config, teacache=dataclasses.replace(self.config.teacache, threshold=0.0))
        video = config.video
        self.request = Request(PROMPT, self.config.negative_prompt, SEED, video.height, video.width,
                               video.num_frames, video.fps)
        self.condition, self.uncondition = self.base.prompt_embeddings(self.request, {}).chunk(2)
        generator = torch.Generator().manual_seed(SEED)
        self.noise = torch.randn(self.base.latent_shape(self.request), generator=generator)
        self.eager_dit = self.base.dit
        require_compiler("cpu", "the compiled rows of bench/bench_base_stage.py")  # both sides compile
        self.compiled_dit = copy.deepcopy(self.base.dit)  # compiles on its first call
        self.compiled_dit.compile_blocks()
        self.transformer = diffusers_transformer(self.base.dit)
        self.compiled_transformer = diffusers_transformer(self.base.dit)
        self.compiled_transformer.compile_repeated_blocks()
        self.tsr_config = config.stages.tsr

    def pipeline(self, transformer: WanTransformer3DModel) -> WanPipeline:
        sigmas = flow_sigmas(self.config.steps, self.config.shift)
        scheduler = {
            "euler": lambda: FlowMatchEulerDiscreteScheduler(shift=1.0),
            "unipc": lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0),
        }[self.config.sampler]()
        set_timesteps = scheduler.set_timesteps  # WanPipeline calls set_timesteps(steps): give it our schedule
        scheduler.set_timesteps = lambda steps, device=None: set_timesteps(sigmas=sigmas[:-1].numpy(), device=device)
        pipeline = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                               transformer=transformer)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    @torch.no_grad()
    def video(self, variant: str) -> tuple[torch.Tensor, int]:
        """The final latents (1, 16, T', h, w) of `variant` and its DiT passes (a pair counting one)."""
        if variant.startswith("diffusers"):
            transformer = self.compiled_transformer if variant.endswith("compiled") else self.transformer
            _, _, frames, height, width = self.noise.shape
            latents = self.pipeline(transformer)(
                prompt_embeds=self.condition, negative_prompt_embeds=self.uncondition, height=height * 8,
                width=width * 8, num_frames=4 * (frames - 1) + 1, num_inference_steps=self.config.steps,
                guidance_scale=self.config.guidance_scale, latents=self.noise.clone(), output_type="latent",
                return_dict=False,
            )[0]
            return latents, self.config.steps
        self.base.config = self.config if variant == "ours + TeaCache" else self.uncached
        self.base.dit = self.compiled_dit if variant.endswith("compiled") else self.eager_dit
        notes = {}
        latents = self.base.denoise(self.noise.clone(), self.condition, self.uncondition, notes)
        return latents, notes["model_calls"]


def memory_worker(arguments: argparse.Namespace) -> None:
    """Runs in a subprocess: prints the peak memory of one video of `--memory-worker` over the setup."""
    setup = Setup(arguments)
    setup.video(arguments.memory_worker)  # warm-up
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status_kib("VmRSS")
    setup.video(arguments.memory_worker)
    print(json.dumps({"peak_mib": (proc_status_kib("VmHWM") - before) / 1024}))


def peak_memory_mib(variant: str) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--memory-worker", variant, *sys.argv[1:]],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--rounds", type=int, default=2, help="timed videos of each variant")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--memory-worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    if arguments.memory_worker:
        memory_worker(arguments)
        return

    setup = Setup(arguments)
    latents, calls = {}, {}
    seconds = {clock: {variant: [] for variant in VARIANTS} for clock in ("wall", "cpu")}
    for variant in VARIANTS:
        latents[variant], calls[variant] = setup.video(variant)  # warm-up, and the videos compared
    for _ in range(arguments.rounds):
        for variant in VARIANTS:
            wall, cpu = time.perf_counter(), time.process_time()
            setup.video(variant)
            seconds["cpu"][variant].append(time.process_time() - cpu)
            seconds["wall"][variant].append(time.perf_counter() - wall)
    memory = {variant: peak_memory_mib(variant) for variant in VARIANTS}
    tsr = TsrStage(setup.tsr_config)
    frames = {variant: tsr.decode(video, lambda done: None).permute(0, 2, 3, 1).numpy()
              for variant, video in latents.items()}

    config = setup.config
    dit = config.dit
    tokens = setup.noise.shape[2] * setup.noise.shape[3] * setup.noise.shape[4] // 4
    print(
        f"Base stage vs diffusers WanPipeline, CPU float32, {torch.get_num_threads()} thread(s): DiT dim {dit.dim}, "
        f"{dit.num_heads} heads, {dit.num_layers} layers, ffn {dit.ffn_dim}, text ({dit.text_len}, {dit.text_dim}); "
        f"latents {tuple(setup.noise.shape)} ({tokens} tokens); {config.steps} {config.sampler} steps, guidance "
        f"{config.guidance_scale}, shift {config.shift}; TeaCache threshold {config.teacache.threshold}, warmup "
        f"{config.teacache.warmup_steps}\n"
    )
    def median(clock: str, variant: str) -> float:
        return statistics.median(seconds[clock][variant])

    def ratio(clock: str, variant: str, peer: str) -> float:  # within each round, then the median over rounds
        return statistics.median(ours / theirs for ours, theirs in zip(seconds[clock][variant], seconds[clock][peer]))

    def ratios(clock: str, variant: str) -> str:
        return " | ".join(f"{ratio(clock, variant, peer):.3f}" for peer in ("diffusers", "diffusers, compiled"))

    print(f"| variant | DiT passes | wall s per video (median of {arguments.rounds}) | / diffusers | / diffusers, "
          "compiled | CPU s per video | / diffusers | / diffusers, compiled | peak memory (MiB) | / diffusers "
          "| PSNR to our uncached video (dB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for variant in VARIANTS:
        score = "—" if variant == "ours" else f"{min(psnr(frames[variant], frames['ours']), 100.0):.1f}"
        print(f"| {variant} | {calls[variant]} | {median('wall', variant):.2f} | {ratios('wall', variant)} "
              f"| {median('cpu', variant):.2f} | {ratios('cpu', variant)} | {memory[variant]:.0f} "
              f"| {memory[variant] / memory['diffusers']:.3f} | {score} |")


if __name__ == "__main__":
    main()
