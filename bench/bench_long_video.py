"""CPU benchmark: time and peak memory of each stage of the tiny cascade as the clip grows to 2× and
4× the DiT's training length (17 frames, 5 latent frames). From the repository root:

    python bench/bench_long_video.py [--frames 17 33 65] [--threads 2] [key=value ...]
    python bench/bench_long_video.py --parts "base with windows" "base as one clip" -- [key=value ...]

Parts, each run in a fresh subprocess per length:

- base with windows: `BaseStage` with `stages.base.window` 5/2 (the default TeaCache stays on);
- base as one clip: the same without windows (every DiT call sees the whole clip);
- VAE decode: the tsr stage's causal decode of normalised random latents to uint8 frames;
- tsr: the tsr stage's call (decode and ×factor interpolation) on the same latents;
- ssr: the ssr stage's call on uint8 frames of the tsr output's length.

Peak memory is VmHWM − VmRSS-before over the call, after a warm-up call on a 17-frame clip and a
reset of the kernel's peak counter (5 into /proc/self/clear_refs), with glibc's mmap threshold at
64 KiB so freed tensors leave RSS at once (as bench/bench_dit.py). "Output" is the size of what the
call returns (uint8 frames grow with the clip by necessity); "working" is peak − output, what the
part needs beyond its result: bounded memory means it stays flat as the clip grows.
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

import torch  # noqa: E402

from bench.bench_dit import proc_status_kib  # noqa: E402
from cascade.config import load_config  # noqa: E402
from cascade.payload import Clip, Request  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.ssr.stage import SsrStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402

PROMPT = "一个红色的球向右滚动"
PARTS = ("base with windows", "base as one clip", "VAE decode", "tsr", "ssr")
WINDOW = ["stages.base.window.latent_frames=5", "stages.base.window.overlap=2"]
WARM_UP_FRAMES = 17


def make_call(part: str, overrides: list[str]):
    """(setup, call) for a part: setup(frames) builds the input of a clip of `frames` frames,
    call(input) runs the part and returns its output tensor."""
    config = load_config(None, overrides + (WINDOW if part == "base with windows" else []))
    video = config.video

    def request(frames: int) -> Request:
        return Request(PROMPT, "", 5, video.height, video.width, frames, video.fps)

    def latents(frames: int) -> Clip:
        shape = (1, 16, 1 + (frames - 1) // 4, video.height // 8, video.width // 8)
        return Clip(torch.randn(shape, generator=torch.Generator().manual_seed(0)), "latent", video.fps, request(frames))

    if part.startswith("base"):
        stage = BaseStage(config.stages.base)
        return request, lambda frames_request: stage(None, frames_request).data
    if part in ("VAE decode", "tsr"):
        stage = TsrStage(config.stages.tsr)
        if part == "VAE decode":
            return latents, lambda clip: stage.decode(clip.data, lambda done: None)
        return latents, lambda clip: stage(clip, clip.request).data
    stage = SsrStage(config.stages.ssr)
    factor = config.stages.tsr.factor

    def frames_clip(frames: int) -> Clip:
        count = (frames - 1) * factor + 1
        data = torch.randint(0, 256, (1, 3, count, video.height, video.width), dtype=torch.uint8,
                             generator=torch.Generator().manual_seed(0))
        return Clip(data, "pixel", video.fps * factor, request(frames))

    return frames_clip, lambda clip: stage(clip, clip.request).data


def memory_worker(part: str, frames: int, threads: int, overrides: list[str]) -> None:
    torch.set_num_threads(threads)
    setup, call = make_call(part, overrides)
    with torch.no_grad():
        call(setup(WARM_UP_FRAMES))
        inputs = setup(frames)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = proc_status_kib("VmRSS")
        started = time.perf_counter()
        output = call(inputs)
        seconds = time.perf_counter() - started
        peak = proc_status_kib("VmHWM")
    print(json.dumps({"peak_mib": (peak - before) / 1024, "output_mib": output.numel() * output.element_size() / 2**20,
                      "seconds": seconds}))


def measure(part: str, frames: int, threads: int, overrides: list[str]) -> dict:
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, __file__, "--worker", part, str(frames), "--threads", str(threads), *overrides],
        env=environment, capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                        help=f"which parts to measure (default all: {', '.join(PARTS)})")
    parser.add_argument("--worker", nargs=2, metavar=("PART", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.worker:
        memory_worker(args.worker[0], int(args.worker[1]), args.threads, args.overrides)
        return 0
    lengths = [f"{frames} ({frames / args.frames[0]:.0f}×)" for frames in args.frames]
    print("| part | frames | s | peak MiB | output MiB | working MiB (peak − output) |")
    print("|---|---|---|---|---|---|")
    for part in args.parts:
        for frames, length in zip(args.frames, lengths):
            result = measure(part, frames, args.threads, args.overrides)
            print(f"| {part} | {length} | {result['seconds']:.2f} | {result['peak_mib']:.1f} | "
                  f"{result['output_mib']:.1f} | {result['peak_mib'] - result['output_mib']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
