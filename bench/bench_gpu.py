"""GPU benchmark at a released size: our WanDiT and WanVAE against diffusers' classes, same weights,
same inputs, in one process.

    python bench/bench_gpu.py                       # Wan2.1-1.3B, bf16, 832×480, 81 frames, CUDA
    python bench/bench_gpu.py --size tiny --device cpu --height 64 --width 64 --frames 9 --runs 1
                                                    # a quick run of the same code on a CPU

Random weights (the timing does not depend on their values). For each model the table gives the
median wall time of `--runs` timed calls after one warm-up (CUDA synchronised around each call) and
the peak memory the call allocated over the weights and inputs (torch.cuda.max_memory_allocated
after a reset; not measured on a CPU). The DiT row is one forward of batch 1; a sampling step with
classifier-free guidance is two of them. Model FLOP utilisation = the forward's matmul FLOPs
(`dit_forward_flops`, the attention and linear layers, multiply-add = 2) / time / `--peak-tflops`
(default 989: the dense bf16 tensor-core peak of an H100 or H200 SXM). With `--compile` both DiTs
have their blocks compiled by torch.compile (ours `WanDiT.compile_blocks`, as `stages.base.compile`
does; diffusers' `compile_repeated_blocks`); the warm-up call pays the compilation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from diffusers import AutoencoderKLWan  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: E402

from bench_dit import diffusers_model, our_model  # noqa: E402  (bench/, this script's folder)
from stages.attention import attention_backend  # noqa: E402
from stages.base.dit import WAN_DIT_SIZES, WanDiTConfig  # noqa: E402
from stages.base.vae import WAN_VAE_SIZES, WanVAE, WanVAEConfig  # noqa: E402

# Every released DiT shares the Wan2.1 VAE; the quick CPU run narrows it (diffusers' converter of the
# official names knows only Wan2.1's two residual blocks per level, which the project's tiny VAE lacks).
VAE_OF = {"1.3b": WAN_VAE_SIZES["wan2.1"], "14b": WAN_VAE_SIZES["wan2.1"],
          "tiny": replace(WAN_VAE_SIZES["wan2.1"], base_dim=16)}


def dit_forward_flops(config: WanDiTConfig, tokens: int) -> float:
    """Matmul FLOPs of one forward over `tokens` video tokens and `config.text_len` text tokens."""
    dim, text = config.dim, config.text_len
    self_attention = 2 * tokens * 4 * dim * dim + 2 * 2 * tokens * tokens * dim  # q k v o; q·kᵀ and ·v
    cross_attention = 2 * tokens * 2 * dim * dim + 2 * text * 2 * dim * dim + 2 * 2 * tokens * text * dim
    feed_forward = 2 * tokens * 2 * dim * config.ffn_dim
    return config.num_layers * (self_attention + cross_attention + feed_forward)


def to_dtype_as_diffusers_loads(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)` but for the modules diffusers keeps in float32 when it loads a model in a
    lower precision (`_keep_in_fp32_modules`), so the reference runs as a diffusers user gets it."""
    model = model.to(dtype)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if keep & set(name.split(".")) and tensor.is_floating_point():
                tensor.data = tensor.data.float()
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(call, device: torch.device, runs: int) -> tuple[float, float]:
    """(median seconds, peak GiB allocated over what was allocated before; NaN on a CPU) of `call()`."""
    with torch.inference_mode():
        call()  # warm-up: kernels chosen, caches filled
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        seconds = []
        for _ in range(runs):
            synchronize(device)
            start = time.perf_counter()
            call()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(seconds), peak


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def bench_dit(config: WanDiTConfig, latent_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              runs: int, peak_tflops: float, compile: bool) -> list[str]:
    reference = diffusers_model(config)
    ours = our_model(reference, config).to(device, dtype)
    reference = to_dtype_as_diffusers_loads(reference, dtype).to(device)
    if compile:
        ours.compile_blocks()
        reference.compile_repeated_blocks()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(latent_shape, generator=generator).to(device, dtype)
    timestep = torch.tensor([700.0], device=device)
    text = torch.zeros(1, config.text_len, config.text_dim)
    text[:, :40] = torch.randn(1, 40, config.text_dim, generator=generator)  # a prompt of 40 tokens
    text = text.to(device, dtype)
    calls = {"ours": lambda: ours(latents, timestep, text),
             "diffusers": lambda: reference(latents, timestep, text, return_dict=False)[0]}
    with torch.inference_mode():
        difference = relative_error(calls["ours"](), calls["diffusers"]())
    patch = config.patch_size
    tokens = (latent_shape[2] // patch[0]) * (latent_shape[3] // patch[1]) * (latent_shape[4] // patch[2])
    flops = dit_forward_flops(config, tokens)
    rows = []
    results = {name: measure(call, device, runs) for name, call in calls.items()}
    for name, (seconds, peak) in results.items():
        utilisation = flops / seconds / (peak_tflops * 1e12)
        rows.append(f"| DiT forward ({tokens} tokens, batch 1) | {name} | {seconds:.3f} | {2 * seconds:.3f} "
                    f"| {flops / seconds / 1e12:.1f} TFLOP/s, MFU {100 * utilisation:.1f}% | {peak:.2f} |")
    rows.append(f"| DiT | ours / diffusers | {results['ours'][0] / results['diffusers'][0]:.3f} | "
                f"| | {results['ours'][1] / results['diffusers'][1]:.3f} |")
    return rows + [f"<!-- DiT outputs differ by {difference:.1e} (max abs / max abs) -->"]


def bench_vae(config: WanVAEConfig, latent_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
              runs: int) -> list[str]:
    torch.manual_seed(0)
    ours = WanVAE(config).eval()
    reference = AutoencoderKLWan(base_dim=config.base_dim, z_dim=config.z_dim, dim_mult=list(config.dim_mult),
                                 num_res_blocks=config.num_res_blocks,
                                 temperal_downsample=list(config.temporal_downsample),
                                 latents_mean=config.latents_mean, latents_std=config.latents_std).eval()
    reference.load_state_dict(convert_wan_vae_to_diffusers(ours.state_dict()), strict=True)
    ours, reference = ours.to(device, dtype), to_dtype_as_diffusers_loads(reference, dtype).to(device)
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(2)).to(device)
    mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
    calls = {"ours": lambda: ours.decode(latents),
             "diffusers": lambda: reference.decode((latents * std + mean).to(dtype)).sample}
    frames = 1 + 4 * (latent_shape[2] - 1)
    rows = []
    results = {name: measure(call, device, runs) for name, call in calls.items()}
    for name, (seconds, peak) in results.items():
        rows.append(f"| VAE decode ({frames} frames) | {name} | {seconds:.3f} | | | {peak:.2f} |")
    rows.append(f"| VAE decode | ours / diffusers | {results['ours'][0] / results['diffusers'][0]:.3f} | | "
                f"| {results['ours'][1] / results['diffusers'][1]:.3f} |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(VAE_OF), default="1.3b", help="DiT size (default 1.3b)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81, help="1 + 4k frames (default 81)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls of each model after a warm-up")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense peak for --dtype")
    parser.add_argument("--skip", choices=["dit", "vae"], action="append", default=[], help="leave a model out")
    parser.add_argument("--compile", action="store_true", help="compile both DiTs' blocks (torch.compile)")
    arguments = parser.parse_args()
    if (arguments.frames - 1) % 4 or arguments.height % 16 or arguments.width % 16:
        parser.error(f"--frames {arguments.frames} must be 1 + 4k and --height {arguments.height}, "
                     f"--width {arguments.width} multiples of 16")
    device = torch.device(arguments.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu for a quick run of the code)")
    dtype = getattr(torch, arguments.dtype)
    latent_shape = (1, 16, 1 + (arguments.frames - 1) // 4, arguments.height // 8, arguments.width // 8)
    config = replace(WAN_DIT_SIZES[arguments.size])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    probe = torch.zeros(1, 1, 1, 8, device=device, dtype=dtype)
    print(f"{name}, torch {torch.__version__}, {arguments.dtype}, DiT {arguments.size}, latents {latent_shape}, "
          f"attention {attention_backend(probe)}, DiT blocks {'compiled' if arguments.compile else 'eager'}, "
          f"median of {arguments.runs} after a warm-up\n")
    print("| what | model | time (s) | CFG step = 2 forwards (s) | throughput | peak memory (GiB) |")
    print("|---|---|---|---|---|---|")
    if "dit" not in arguments.skip:
        print("\n".join(bench_dit(config, latent_shape, dtype, device, arguments.runs, arguments.peak_tflops,
                                   arguments.compile)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "vae" not in arguments.skip:
        print("\n".join(bench_vae(VAE_OF[arguments.size], latent_shape, dtype, device, arguments.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
