"""Evaluates the embedded tiny cascade on the procedural world and writes docs/eval_world.md. Run from
the repository root:

    python bench/eval_world.py [--prompts 48] [key=value config overrides]

Prompts: `stages.world.held_out_prompts`, single-object prompts in the held-out phrasings (which
no model saw in training), half Chinese, cycling through the six colours and eight directions. Each
prompt runs through the base stage of `configs/tiny.yaml` with its own seed (SEED + index) and is
decoded by the tsr stage's VAE; `stages.world_checks.check_base_clip` reads the dominant colour by
hue and the direction of the object's centroid. For the prompts whose base clip obeys, the tsr
stage's output (×factor frames) is checked for monotonic motion, and for all prompts the ssr stage's
output is compared with bicubic upsampling of the same frames by high-frequency energy (mean
squared Laplacian of the luma).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cascade.config import load_config  # noqa: E402
from cascade.outputs import write_atomic  # noqa: E402
from cascade.payload import Clip  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.ssr.stage import SsrStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.world import held_out_prompts  # noqa: E402
from stages.world_checks import (  # noqa: E402
    base_frames, check_base_clip, high_frequency_energy, is_monotonic, request_for,
)

SEED = 1234  # the tests use the same seeds
DOC_PATH = REPOSITORY_ROOT / "docs" / "eval_world.md"
NOTES_HEADING = "## Notes"  # a hand-written section of the doc from this heading on is kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    config = load_config(None, arguments.overrides)
    base, tsr, ssr = BaseStage(config.stages.base), TsrStage(config.stages.tsr), SsrStage(config.stages.ssr)
    video = config.video

    rows, monotonic, energy_ratios, seconds = [], [], [], []
    for index, case in enumerate(held_out_prompts(arguments.prompts)):
        request = request_for(case, SEED + index, config.stages.base.negative_prompt, video.height, video.width,
                              video.num_frames, video.fps)
        started = time.perf_counter()
        frames = base_frames(base, tsr, request)
        seconds.append(time.perf_counter() - started)
        check = check_base_clip(frames, case)
        rows.append(check)
        if check.passed:
            interpolated = tsr(base(None, request), request).data[0].transpose(1, 2, 3, 0)
            monotonic.append(is_monotonic(interpolated, case.direction))
        upsampled = ssr(Clip(np.ascontiguousarray(frames.transpose(3, 0, 1, 2)[None]), "pixel", video.fps, request),
                        request).data[0].transpose(1, 2, 3, 0)
        size = (upsampled.shape[2], upsampled.shape[1])
        bicubic = np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC)) for frame in frames])
        energy_ratios.append(high_frequency_energy(upsampled) / max(high_frequency_energy(bicubic), 1e-9))
        print(f"{'ok ' if check.passed else 'BAD'} {case.prompt!r}: {check.colour} {check.direction} "
              f"({check.motion:.0f} px)", flush=True)

    count = len(rows)
    colour_rate = sum(row.colour_matches for row in rows) / count
    direction_rate = sum(row.direction_matches for row in rows) / count
    both_rate = sum(row.passed for row in rows) / count
    by_language = {
        language: [row for row in rows if any("\u4e00" <= char <= "\u9fff" for char in row.case.prompt) == chinese]
        for language, chinese in (("English", False), ("Chinese", True))
    }
    wrong_directions = Counter((row.case.direction, row.direction) for row in rows if not row.direction_matches)
    lines = [
        "# The tiny cascade on the procedural world: evaluation",
        "",
        "Written by `python bench/eval_world.py`; the method is in its docstring. The same checks, on the "
        "same prompts and seeds, run in CI (tests/test_world_cascade.py, target: both right for at least 90%).",
        "",
        f"- prompts: {count} held-out single-object prompts (`stages.world.held_out_prompts`), phrasings never "
        f"used in training, {len(by_language['Chinese'])} of them Chinese; seeds {SEED} + index",
        f"- config: `configs/tiny.yaml` ({video.height}×{video.width}, {video.num_frames} frames, "
        f"{config.stages.base.steps} {config.stages.base.sampler} steps, guidance {config.stages.base.guidance_scale}, "
        f"shift {config.stages.base.shift})",
        f"- base stage + VAE decode: {np.median(seconds):.2f} s per prompt (median, {arguments.threads} threads)",
        "",
        "| check | rate |",
        "|---|---|",
        f"| colour matches (hue) | {colour_rate:.1%} |",
        f"| direction matches (centroid) | {direction_rate:.1%} |",
        f"| **both** | **{both_rate:.1%}** |",
        *(f"| both, {language} prompts | {sum(row.passed for row in subset) / max(len(subset), 1):.1%} |"
          for language, subset in by_language.items()),
        f"| tsr output monotonic (of the {len(monotonic)} obeyed clips) | "
        f"{sum(monotonic) / max(len(monotonic), 1):.1%} |",
        f"| ssr high-frequency energy above bicubic | {np.mean([ratio > 1 for ratio in energy_ratios]):.1%} "
        f"(median ratio {np.median(energy_ratios):.2f}) |",
        "",
        "Failures:",
        "",
        *[f"- {row.case.prompt!r} (wanted {row.case.colour}, {row.case.direction}): measured {row.colour}, "
          f"{row.direction}, {row.motion:.0f} px" for row in rows if not row.passed],
        *([] if both_rate < 1 else ["- none"]),
        "",
        f"Wrong directions (wanted, measured): {dict(wrong_directions) or 'none'}",
        "",
    ]
    notes = ""
    if DOC_PATH.is_file() and NOTES_HEADING in DOC_PATH.read_text():
        notes = DOC_PATH.read_text()[DOC_PATH.read_text().index(NOTES_HEADING):]
    write_atomic(DOC_PATH, ("\n".join(lines) + ("\n" + notes if notes else "")).encode())
    print("\n".join(lines[10:20]))
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
