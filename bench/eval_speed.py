"""How far the tiny DiT moves its object in one window, by the prompt's speed, against the world.
Prints a table and writes it to docs/long_video.md between the markers there. From the repository root:

    python bench/eval_speed.py [--prompts 48] [--guidance 1 3 5] [key=value config overrides]

Each held-out prompt (`stages.world.held_out_prompts`, seed SEED + index as bench/eval_world.py)
runs through the base stage as one 17-frame clip at each guidance scale; its latents are decoded by
the tsr stage's VAE, and `stages.world_checks.check_base_clip` reads how far the object's centroid
moves from its first to its last sighting, as a share of the frame side. The medians are over the
slow and over the fast prompts, and over those of them whose clip also moved in the prompt's
direction. The world's own clips of the same prompts (`clip_for`, same seeds) give the reference.

Why it matters for long clips: over 49 frames an object goes 3 times its 17-frame distance, and the
frame has room for a path of `1 − 2·(largest radius + edge gap)` of its side; a path longer than that
cannot keep its direction in view through the clip, whatever the long-clip sampler.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.eval_long_video import SEED, record_table  # noqa: E402
from cascade.config import load_config  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.world import EDGE_GAP, SIZE_RANGE, SPEEDS, clip_for, held_out_prompts, render_clip  # noqa: E402
from stages.world_checks import base_frames, check_base_clip, request_in_config  # noqa: E402

FRAMES = 17  # one window of the tiny DiT
LONG_FRAMES = 49
ROOM = 1.0 - 2 * (SIZE_RANGE[1] + EDGE_GAP)  # the longest path the largest shape can take in view
BEGIN, END = "<!-- eval_speed: begin -->", "<!-- eval_speed: end -->"


def distances(clips, cases) -> dict[str, tuple[list[float], list[float]]]:
    """speed -> (distances moved by all its clips, by those that went the prompt's way), shares of
    the frame side."""
    moved = {speed: ([], []) for speed in SPEEDS}
    for frames, case in zip(clips, cases):
        check = check_base_clip(frames, case)
        every, obeying = moved[case.speed]
        every.append(check.motion / frames.shape[2])
        if check.direction_matches:
            obeying.append(check.motion / frames.shape[2])
    return moved


def generated_clips(overrides: list[str], cases) -> list[np.ndarray]:
    config = load_config(None, [f"video.num_frames={FRAMES}", *overrides])
    base, tsr = BaseStage(config.stages.base), TsrStage(config.stages.tsr)
    return [base_frames(base, tsr, request_in_config(case, SEED + index, config))[1] for index, case in enumerate(cases)]


def world_clips(cases) -> list[np.ndarray]:
    return [render_clip(clip_for(case.colour, case.shape, case.direction, case.speed, np.random.default_rng(SEED + index),
                                 FRAMES), FRAMES, 128) for index, case in enumerate(cases)]


def row(name: str, moved: dict[str, tuple[list[float], list[float]]]) -> str:
    cells = []
    for speed in SPEEDS:
        every, obeying = moved[speed]
        long_path = np.median(obeying) * (LONG_FRAMES - 1) / (FRAMES - 1) if obeying else float("nan")
        cells += [f"{np.median(every):.2f}", f"{np.median(obeying):.2f} ({len(obeying)}/{len(every)})" if obeying else "—",
                  f"{long_path:.2f}"]
    return f"| {name} | " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = held_out_prompts(args.prompts)
    columns = [f"{speed}: {column}" for speed in SPEEDS
               for column in ("moved", "moved, the prompt's way", f"{LONG_FRAMES} frames at that pace")]
    lines = [
        f"{args.prompts} held-out prompts, {FRAMES} frames at 128×128, tiny config"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "") + f", {args.threads} threads. Median "
        f"distance moved, shares of the frame side; the path the largest shape has room for is {ROOM:.2f}:",
        "",
        "| clips | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        row("the world's own (reference)", distances(world_clips(cases), cases)),
    ]
    print(lines[-1], flush=True)
    for scale in args.guidance:
        clips = generated_clips([*args.overrides, f"stages.base.guidance_scale={scale:g}"], cases)
        lines.append(row(f"the tiny DiT, guidance {scale:g}", distances(clips, cases)))
        print(lines[-1], flush=True)
    record_table("\n".join(lines), BEGIN, END, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
