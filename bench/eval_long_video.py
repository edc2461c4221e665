"""Evaluates long clips of the embedded tiny cascade: 49 frames (13 latent frames) from a DiT trained
on 17 (5 latent frames), denoised as one clip or as overlapping windows (`stages.base.window`).
Prints a table and writes it to docs/long_video.md between the markers there. From the repository root:

    python bench/eval_long_video.py [--prompts 24] [--frames 49] [key=value config overrides]

Each held-out prompt (`stages.world.held_out_prompts`, seed SEED + index as bench/eval_world.py)
runs through the base stage under each variant; its latents are decoded by the tsr stage's VAE and
read back by `stages.world_checks.check_long_clip`: the clip is cut into segments of one window's
frames (17, one every 16), and the rates are of clips whose every segment has the prompt's colour
("colour holds"), every segment the prompt's direction ("direction holds"), the whole clip the
prompt's direction from the first to the last sighting of its object, and no frame-to-frame change
at a window joint above the largest change elsewhere ("joints smooth"; without windows, the joints
of the 5/2 windows are read, for comparison). The columns that end in "slow prompts" are rates
among the slow prompts alone (a fast object cannot keep its direction for 49 frames and stay in
the frame): "direction holds", the same rate segment by segment ("by segment"), and "keeps going",
the clips whose object never falls back along the prompt's direction by more than
`FALL_BACK_LIMIT` of the frame side (a window that starts its path again makes it fall back).
The first row reads the world's own clips of the prompts the same way (`evaluate_world`).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.config import load_config  # noqa: E402
from cascade.outputs import write_atomic  # noqa: E402
from flows.windows import window_spans  # noqa: E402
from stages.base.stage import TIME_COMPRESSION, BaseStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.world import clip_for, held_out_prompts, render_clip  # noqa: E402
from stages.world_checks import base_frames, check_base_clip, check_long_clip, request_in_config  # noqa: E402

SEED = 1234  # + the prompt's index, as bench/eval_world.py and the tests
DOC_PATH = REPOSITORY_ROOT / "docs" / "long_video.md"
BEGIN, END = "<!-- eval_long_video: begin -->", "<!-- eval_long_video: end -->"
OVERVIEW = ["stages.base.dit_weights=weights/base/dit_overview.safetensors", "stages.base.window.overview=true"]
VARIANTS = {  # name -> overrides
    "one clip of 13 latent frames (no windows)": [],
    "windows of 5, overlap 1": ["stages.base.window.latent_frames=5", "stages.base.window.overlap=1"],
    "windows of 5, overlap 2": ["stages.base.window.latent_frames=5", "stages.base.window.overlap=2"],
    "windows of 5, overlap 3": ["stages.base.window.latent_frames=5", "stages.base.window.overlap=3"],
    "windows of 5, overlap 2, no TeaCache": [
        "stages.base.window.latent_frames=5", "stages.base.window.overlap=2", "stages.base.teacache.threshold=0",
    ],
    "windows of 5, overlap 4 (a window every latent frame), no TeaCache": [
        "stages.base.window.latent_frames=5", "stages.base.window.overlap=4", "stages.base.teacache.threshold=0",
    ],
    # the DiT trained on overview windows too, with the overview window on (the page's section on it)
    "overview DiT: windows of 5, overlap 2, and the overview": [
        "stages.base.window.latent_frames=5", "stages.base.window.overlap=2", *OVERVIEW,
    ],
    "overview DiT: windows of 5, overlap 2, and the overview, no TeaCache": [
        "stages.base.window.latent_frames=5", "stages.base.window.overlap=2", *OVERVIEW, "stages.base.teacache.threshold=0",
    ],
}
COMPARISON_WINDOW = (5, 2)  # whose joints a clip without windows is read at
WORLD_ROW = "the world's own clips (reference)"
RATES = ("colour holds", "direction holds", "direction holds, slow prompts", "whole-clip direction", "joints smooth",
         "keeps going, slow prompts")
BY_SEGMENT = "direction by segment, slow prompts"  # the column of the rates "segment 1, slow prompts", ...


def evaluate(overrides: list[str], prompts: int) -> dict[str, float]:
    config = load_config(None, overrides)
    base, tsr = BaseStage(config.stages.base), TsrStage(config.stages.tsr)
    counts = dict.fromkeys(RATES, 0)
    calls = seconds = 0.0
    cases = held_out_prompts(prompts)
    for index, case in enumerate(cases):
        request = request_in_config(case, SEED + index, config)
        started = time.perf_counter()
        latents, frames = base_frames(base, tsr, request)
        seconds += time.perf_counter() - started
        windows = latents.notes.get("windows") or [list(span) for span in window_spans(latents.shape[2], *COMPARISON_WINDOW)]
        add_checks(counts, frames, case, windows)
        calls += latents.notes["model_calls"]
    return {**rates(counts, cases), "DiT passes": calls / prompts, "s per clip": seconds / prompts}


def evaluate_world(num_frames: int, prompts: int) -> dict[str, float]:
    """The same checks on the world's own clips of each prompt (stages/world.py's `clip_for`, at the
    cascade's 128×128, read at the 5/2 windows' joints). A prompt the world cannot make a clip of
    that long (its object would leave the frame) counts as failing every check."""
    counts = dict.fromkeys(RATES, 0)
    cases = held_out_prompts(prompts)
    windows = [list(span) for span in window_spans(1 + (num_frames - 1) // TIME_COMPRESSION, *COMPARISON_WINDOW)]
    for index, case in enumerate(cases):
        try:
            clip = clip_for(case.colour, case.shape, case.direction, case.speed, np.random.default_rng(SEED + index), num_frames)
        except ValueError:
            continue
        add_checks(counts, render_clip(clip, num_frames, 128), case, windows)
    return {**rates(counts, cases), "DiT passes": float("nan"), "s per clip": float("nan")}


def add_checks(counts: dict[str, int], frames, case, windows: list[list[int]]) -> None:
    check = check_long_clip(frames, case, windows)
    slow = case.speed == "slow"
    counts["colour holds"] += check.colour_holds
    counts["direction holds"] += check.direction_holds
    counts["direction holds, slow prompts"] += check.direction_holds and slow
    counts["whole-clip direction"] += check_base_clip(frames, case).direction_matches
    counts["joints smooth"] += check.joints_smooth
    counts["keeps going, slow prompts"] += check.keeps_going and slow
    for number, segment in enumerate(check.segments, 1):
        name = f"segment {number}, slow prompts"
        counts[name] = counts.get(name, 0) + (segment.direction_matches and slow)


def rates(counts: dict[str, int], cases) -> dict[str, float]:
    """Each count over the prompts it is of (NaN where there are none: no slow prompts)."""
    slow = sum(case.speed == "slow" for case in cases)
    totals = {name: slow if name.endswith("slow prompts") else len(cases) for name in counts}
    return {name: count / totals[name] if totals[name] else float("nan") for name, count in counts.items()}


def cell(result: dict[str, float], column: str) -> str:
    if column == BY_SEGMENT:
        segments = [result[name] for name in result if name.startswith("segment ")]
        return "—" if not segments or math.isnan(segments[0]) else " / ".join(f"{rate:.0%}" for rate in segments)
    if math.isnan(result[column]):
        return "—"
    return f"{result[column]:.0%}" if column in RATES else f"{result[column]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    columns = [*RATES[:3], BY_SEGMENT, *RATES[3:], "DiT passes", "s per clip"]
    lines = [
        f"{args.prompts} held-out prompts, {args.frames} frames at 128×128, tiny config"
        + (f" with {' '.join(args.overrides)}" if args.overrides else "") + f", {args.threads} threads:",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    rows = {WORLD_ROW: functools.partial(evaluate_world, args.frames, args.prompts)}
    for name, overrides in VARIANTS.items():
        rows[name] = functools.partial(evaluate, [f"video.num_frames={args.frames}", *args.overrides, *overrides], args.prompts)
    for name, run in rows.items():
        result = run()
        cells = [cell(result, column) for column in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    record_table("\n".join(lines), BEGIN, END, write=not args.no_write)
    return 0


def record_table(table: str, begin: str, end: str, write: bool, path: Path = DOC_PATH) -> None:
    """Prints `table` and, with `write`, puts it in place of what lies between the lines `begin` and
    `end` of the file at `path`."""
    print(table)
    if not write:
        return
    document = path.read_text()
    if begin not in document or end not in document:
        raise SystemExit(f"{path} lacks the markers {begin} and {end}")
    head, rest = document.split(begin, 1)
    write_atomic(path, (head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]).encode())


if __name__ == "__main__":
    raise SystemExit(main())
