"""How far the tiny DiT moves its object in one window, by the prompt's speed, against the world.
Prints a table and writes it to docs/long_video.md between the markers there. From the repository root:

    python bench/eval_speed.py [--prompts 48] [--guidance 1 3 5] [key=value config overrides]

Each held-out prompt (`stages.world.held_out_prompts`, seed SEED + index as bench/eval_world.py)
runs through the base stage as one 17-frame clip at each guidance scale; its latents are decoded by
the tsr stage's VAE, and `stages.world_checks.check_base_clip` reads how far the object's centroid
moves from its first to its last sighting, as a share of the frame side. A cell is the median over
the clips of its prompts that moved the prompt's way (their count in brackets where some did not).
The prompts are grouped by their speed and by whether their words name it ("slowly", "快速地", ...):
the world's phrasings name the speed in some templates only, and a prompt that does not name it
gives the DiT nothing to tell the two speeds apart. The world's own clips of the same prompts
(`clip_for`, same seeds) give the reference.

Why it matters for long clips: over 49 frames an object goes 3 times its 17-frame distance, and the
frame has room for a path of `1 − 2·(largest radius + edge gap)` of its side; a path longer than that
cannot keep its direction in view through the clip, whatever the long-clip sampler.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.eval_long_video import SEED, record_table  # noqa: E402
from cascade.config import load_config  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.world import EDGE_GAP, SIZE_RANGE, SPEEDS, PromptCase, clip_for, held_out_prompts, render_clip  # noqa: E402
from stages.world_checks import base_frames, check_base_clip, request_in_config  # noqa: E402

FRAMES = 17  # one window of the tiny DiT
LONG_FRAMES = 49
ROOM = 1.0 - 2 * (SIZE_RANGE[1] + EDGE_GAP)  # the longest path the largest shape can take in view
BEGIN, END = "<!-- eval_speed: begin -->", "<!-- eval_speed: end -->"


def group(case: PromptCase) -> str:
    """The prompt's speed, and whether its words name it."""
    names = any(word in case.prompt for word in SPEEDS[case.speed][1:])
    return f"{case.speed}, {'naming' if names else 'not naming'} the speed"


def cells(clips: list[np.ndarray], cases: list[PromptCase], counts: Counter[str]) -> list[str]:
    """Per group (`counts`: group -> its prompts): the median distance moved by the clips that went
    the prompt's way."""
    moved = {name: [] for name in counts}
    for frames, case in zip(clips, cases):
        check = check_base_clip(frames, case)
        if check.direction_matches:
            moved[group(case)].append(check.motion / frames.shape[2])
    return [("—" if not moved[name] else f"{np.median(moved[name]):.2f}")
            + ("" if len(moved[name]) == counts[name] else f" ({len(moved[name])})") for name in counts]


def generated_clips(overrides: list[str], cases: list[PromptCase]) -> list[np.ndarray]:
    config = load_config(None, [f"video.num_frames={FRAMES}", *overrides])
    base, tsr = BaseStage(config.stages.base), TsrStage(config.stages.tsr)
    return [base_frames(base, tsr, request_in_config(case, SEED + index, config))[1] for index, case in enumerate(cases)]


def world_clips(cases: list[PromptCase]) -> list[np.ndarray]:
    return [render_clip(clip_for(case.colour, case.shape, case.direction, case.speed, np.random.default_rng(SEED + index),
                                 FRAMES), FRAMES, 128) for index, case in enumerate(cases)]


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
    counts = Counter(sorted(group(case) for case in cases))  # group -> its prompts, in the table's order
    columns = {"the world's own clips": world_clips(cases)}
    for scale in args.guidance:
        columns[f"tiny DiT, guidance {scale:g}"] = generated_clips([*args.overrides, f"stages.base.guidance_scale={scale:g}"], cases)
        print(f"guidance {scale:g} done", flush=True)
    table = {name: cells(clips, cases, counts) for name, clips in columns.items()}
    lines = [
        f"{args.prompts} held-out prompts, {FRAMES} frames at 128×128, tiny config"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "") + f", {args.threads} threads. Median "
        f"distance moved in {FRAMES} frames by the clips that went the prompt's way (their count in brackets where "
        f"some did not), as a share of the frame side; over {LONG_FRAMES} frames an object goes "
        f"{(LONG_FRAMES - 1) // (FRAMES - 1)} times as far, and the largest shape has room for a path of {ROOM:.2f}:",
        "",
        "| prompts | count | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for index, (name, count) in enumerate(counts.items()):
        lines.append(f"| {name} | {count} | " + " | ".join(table[column][index] for column in columns) + " |")
    record_table("\n".join(lines), BEGIN, END, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
