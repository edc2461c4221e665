"""Time and peak memory of the VAE decode on the CPU.

(a) our `WanVAE.decode` against diffusers' `AutoencoderKLWan.decode`, same sizes and weights;
(b) our chunked decode at 17 and 81 frames, consumed chunk by chunk into a preallocated uint8 array
    (how the tsr stage uses it) and returned whole as a float tensor by `decode`.

Method: every case runs in its own fresh subprocess (`--case NAME`). After the model is built and
the inputs (and, in the uint8 case, the output array) are allocated and touched, the process's peak
resident set (VmHWM) is reset to its current size by writing 5 to /proc/self/clear_refs; after the
decode the new VmHWM minus the resident size before it is the decode's peak memory. Each case runs
twice: with glibc's default malloc settings ("peak"), and with its mmap threshold fixed at 64 KiB
("live"), so that every freed tensor goes back to the OS and the peak counts the tensors alive at
once rather than what malloc keeps cached (the default's numbers vary from run to run). Times, with
the default settings, are the best of the measured run and `--repeats` more (comparison only).
Run from the repository root:

    python bench/bench_vae.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.base.vae import WanVAE, WanVAEConfig  # noqa: E402

COMPARISON_BASE_DIM = 32
COMPARISON_LATENTS = (1, 16, 5, 32, 32)  # -> 17 frames of 256x256
STREAMING_BASE_DIM = 16  # the "tiny" size
STREAMING_LATENT_SIZE = 16  # -> 128x128 frames, the tiny cascade's size
STREAMING_LATENT_FRAMES = {"17": 5, "81": 21}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Peak resident memory above the current resident size, from a reset of VmHWM (Linux), and
    the time taken."""

    def __enter__(self) -> "PeakMemory":
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
        self.start_kib = _status_kib("VmRSS")
        self.start_time = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self.start_time
        self.peak_mib = (_status_kib("VmHWM") - self.start_kib) / 1024


def _random_latents(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _ours(base_dim: int) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(WanVAEConfig(base_dim=base_dim)).eval()


def _diffusers(base_dim: int) -> torch.nn.Module:
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    model = AutoencoderKLWan(base_dim=base_dim).eval()
    model.load_state_dict(convert_wan_vae_to_diffusers(_ours(base_dim).state_dict()))  # same weights
    return model


def _time(function, repeats: int, first_run_seconds: float) -> float:
    best = first_run_seconds
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def run_case(case: str, repeats: int) -> dict:
    torch.manual_seed(0)
    if case in ("ours", "diffusers"):
        latents = _random_latents(COMPARISON_LATENTS)
        if case == "ours":
            model = _ours(COMPARISON_BASE_DIM)
            decode = lambda: model.decode(latents)  # noqa: E731
        else:
            model = _diffusers(COMPARISON_BASE_DIM)
            mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
            std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)

            def decode() -> torch.Tensor:
                with torch.no_grad():
                    return model.decode(latents * std + mean).sample

        with PeakMemory() as memory:
            decode()
        return {"peak_mib": memory.peak_mib, "seconds": _time(decode, repeats, memory.seconds)}

    mode, frames = case.split("_")  # "chunked_17", "whole_81", ...
    model = _ours(STREAMING_BASE_DIM)
    latent_frames = STREAMING_LATENT_FRAMES[frames]
    latents = _random_latents((1, 16, latent_frames, STREAMING_LATENT_SIZE, STREAMING_LATENT_SIZE))
    size = STREAMING_LATENT_SIZE * model.spatial_compression
    video = np.ones((1 + 4 * (latent_frames - 1), size, size, 3), dtype=np.uint8)  # preallocated, touched

    peak_by_latent_frame = []  # peak so far after each latent frame, MiB

    def decode_into_uint8() -> None:
        start = 0
        for chunk in model.iter_decode(latents):  # (1, 3, t, H, W) in [-1, 1]
            chunk_uint8 = chunk[0].add(1).mul_(127.5).round_().to(torch.uint8).permute(1, 2, 3, 0)
            video[start : start + chunk_uint8.shape[0]] = chunk_uint8.numpy()
            start += chunk_uint8.shape[0]
            peak_by_latent_frame.append((_status_kib("VmHWM") - memory.start_kib) / 1024)

    decode = decode_into_uint8 if mode == "chunked" else (lambda: model.decode(latents))
    with PeakMemory() as memory:
        decode()
    return {"peak_mib": memory.peak_mib, "seconds": memory.seconds, "peak_by_latent_frame": peak_by_latent_frame}


def _in_subprocess(case: str, repeats: int) -> dict:
    """The case's time and peak memory with glibc's default malloc settings, and its peak memory
    again in a second process with the mmap threshold fixed at 64 KiB (live tensors)."""
    command = [sys.executable, __file__, "--case", case]
    result = json.loads(_run(command + ["--repeats", str(repeats)], os.environ))
    live = json.loads(_run(command + ["--repeats", "0"], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}))
    return {**result, "live_peak_mib": live["peak_mib"]}


def _run(command: list[str], environment: dict) -> str:
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPOSITORY_ROOT, env=environment)
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", help="run one case in this process and print its JSON result")
    parser.add_argument("--repeats", type=int, default=1, help="comparison: timed runs after the measured one")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs\n")
    ours, theirs = _in_subprocess("ours", args.repeats), _in_subprocess("diffusers", args.repeats)
    _, _, latent_frames, height, width = COMPARISON_LATENTS
    print(f"(a) decode, base_dim {COMPARISON_BASE_DIM}, latents {COMPARISON_LATENTS} -> "
          f"{1 + 4 * (latent_frames - 1)} frames of {8 * height}x{8 * width}\n")
    print("| decoder | time (s) | peak memory (MiB) | peak memory, live tensors (MiB) |")
    print("|---|---|---|---|")
    for name, result in (("ours", ours), ("diffusers", theirs)):
        print(f"| {name} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | {result['live_peak_mib']:.0f} |")
    ratios = [ours[key] / theirs[key] for key in ("seconds", "peak_mib", "live_peak_mib")]
    print("| ours / diffusers | " + " | ".join(f"{ratio:.2f}" for ratio in ratios) + " |\n")

    size = STREAMING_LATENT_SIZE * 8
    consumers = {"chunked": "iter_decode -> preallocated uint8", "whole": "decode -> whole float tensor"}
    results = {(mode, frames): _in_subprocess(f"{mode}_{frames}", 0) for mode in consumers for frames in ("17", "81")}
    print(f"(b) our decode, base_dim {STREAMING_BASE_DIM}, {size}x{size} frames: peak memory by clip length\n")
    print("| consumer | memory | 17 frames (MiB) | 81 frames (MiB) | growth |")
    print("|---|---|---|---|---|")
    for mode, label in consumers.items():
        short, long = results[mode, "17"], results[mode, "81"]
        for key, kind in (("peak_mib", "peak, default malloc"), ("live_peak_mib", "peak, live tensors")):
            print(f"| {label} | {kind} | {short[key]:.0f} | {long[key]:.0f} | {long[key] / short[key] - 1:+.0%} |")
    trajectory = ", ".join(f"{peak:.0f}" for peak in results["chunked", "81"]["peak_by_latent_frame"])
    print(f"\nThe 81-frame chunked run, default malloc: peak so far (MiB) after each latent frame: {trajectory}")


if __name__ == "__main__":
    main()
