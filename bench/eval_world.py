"""Evaluates the embedded tiny cascade on the procedural world and writes docs/eval_world.md. Run from
the repository root:

    python bench/eval_world.py [--prompts 48] [key=value config overrides]

Cases: `stages.world.held_out_prompts`, single-object prompts in the held-out phrasings (which no
model saw in training), half Chinese, cycling through the six colours and eight directions.

1. The VAE alone: each case's clip drawn by the world is encoded and decoded by the tsr stage's VAE
   and read back by `stages.world_checks.check_base_clip` (dominant colour by hue, direction of
   the object's centroid): what the cascade can reach at best through this VAE.
2. tsr and ssr against the truth, on the cases' clips drawn by the world (independent of the
   base stage): the tsr stage's interpolator gets every `factor`-th frame of a clip drawn at
   `factor` times the frame rate and is scored on the frames between (PSNR against the drawn
   frames, beside linear blending); the ssr stage gets the 2×2 area average (rounded to uint8) of
   a clip drawn at the stage's output size and is scored against the drawn clip (PSNR and
   high-frequency energy, beside bicubic upsampling).
3. The cascade, once no model of `configs/tiny.yaml` is random: each prompt runs through the base
   stage with its own seed (SEED + index), is decoded by the tsr stage's VAE and checked the same
   way. For the first `--later-stages` prompts whose base clip obeys, the base clip is checked
   for monotonic motion (its object never steps back along the direction by more than
   `stages.world_checks.MONOTONIC_TOLERANCE`, 1 px) and, where it is monotonic, so is the tsr
   stage's output (×factor frames): whether interpolation keeps the motion it is given. For the
   first `--later-stages` prompts the ssr stage's output is compared with bicubic upsampling of the
   same frames by high-frequency energy (mean squared Laplacian of the luma). The colour and
   direction checks then run again with each seed set of `--other-seeds` (seed + index), which
   shows how much of the rate the first seeds owe to chance.
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

from cascade.config import load_config  # noqa: E402
from cascade.outputs import write_atomic  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.ssr.stage import SsrStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.pixels import to_model_range, to_uint8  # noqa: E402
from stages.tsr.interpolator import blend_linearly, interpolate_frames  # noqa: E402
from stages.world import PromptCase, clip_for, held_out_prompts, render_clip  # noqa: E402
from stages.world_checks import (  # noqa: E402
    base_frames, bicubic_upsample, check_base_clip, detail_over_bicubic, high_frequency_energy, interpolated_frames,
    is_monotonic, request_for, request_in_config, super_resolved_frames,
)

SEED = 1234  # the tests use the same seeds
OTHER_SEEDS = (5000, 9000)
DOC_PATH = REPOSITORY_ROOT / "docs" / "eval_world.md"
NOTES_HEADING = "## Notes"  # a hand-written section of the doc from this heading on is kept


def rate(flags) -> str:
    flags = list(flags)
    return f"{sum(flags) / max(len(flags), 1):.1%}"


def is_chinese(prompt: str) -> bool:
    return any("\u4e00" <= char <= "\u9fff" for char in prompt)


def vae_round_trip(tsr: TsrStage, cases) -> list[str]:
    """The VAE alone: each case's clip rendered by the world, encoded and decoded, then checked
    like a generated one. This bounds what the cascade can reach through this VAE."""
    rng = np.random.default_rng(SEED)
    checks = []
    for case in cases:
        frames = render_clip(clip_for(case.colour, case.shape, case.direction, case.speed, rng, 17), 17, 128)
        with torch.no_grad():
            latents = tsr.vae.encode(to_model_range(torch.from_numpy(frames)).permute(3, 0, 1, 2)[None])
        decoded = tsr.decode(latents, lambda done: None).permute(0, 2, 3, 1).numpy()
        checks.append(check_base_clip(decoded, case))
    return [
        "## The VAE alone (round trip of rendered clips)",
        "",
        f"The {len(cases)} cases' clips drawn by the world (17 frames, 128²), encoded and decoded by "
        "`stages.tsr.vae_weights`, then read back as a generated clip would be.",
        "",
        "| check | rate |",
        "|---|---|",
        f"| colour matches (hue) | {rate(check.colour_matches for check in checks)} |",
        f"| direction matches (centroid) | {rate(check.direction_matches for check in checks)} |",
        f"| **both** | **{rate(check.passed for check in checks)}** |",
        "",
        f"Colours read wrong (wanted, read): {dict(Counter((c.case.colour, c.colour) for c in checks if not c.colour_matches)) or 'none'}",
        "",
    ]


def psnr(frames: np.ndarray, truth: np.ndarray) -> float:
    """Mean over frames of the per-frame PSNR of uint8 frames (T, H, W, 3), peak 255."""
    errors = np.square(frames.astype(np.float64) - truth.astype(np.float64))
    return float(np.mean([10 * np.log10(255.0**2 / max(error.mean(), 1e-10)) for error in errors]))


def stages_on_rendered_clips(tsr: TsrStage, ssr: SsrStage, cases, count: int) -> list[str]:
    """tsr and ssr scored against clips the world draws (see the module docstring, 2)."""
    factor, scale = tsr.config.factor, ssr.config.upsampler.scale
    rng = np.random.default_rng(SEED)
    tsr_scores, blend_scores, ssr_scores, bicubic_scores, detail_ratios = [], [], [], [], []
    for case in cases[:count]:
        clip = clip_for(case.colour, case.shape, case.direction, case.speed, rng, 17)
        dense = render_clip(clip, 16 * factor + 1, 128, time_step=1 / factor)  # (49, 128, 128, 3)
        inputs = to_model_range(torch.from_numpy(dense[::factor])).permute(0, 3, 1, 2)  # (17, 3, 128, 128)
        between = np.arange(len(dense)) % factor != 0
        with torch.no_grad():
            interpolated = to_uint8(interpolate_frames(inputs, factor, tsr.interpolator)).permute(0, 2, 3, 1).numpy()
            blended = to_uint8(interpolate_frames(inputs, factor, blend_linearly)).permute(0, 2, 3, 1).numpy()
        tsr_scores.append(psnr(interpolated[between], dense[between]))
        blend_scores.append(psnr(blended[between], dense[between]))

        high = render_clip(clip, 17, 128 * scale)  # (17, 256, 256, 3)
        low = torch.from_numpy(high).permute(0, 3, 1, 2).float()
        low = torch.nn.functional.avg_pool2d(low, scale).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        upsampled = super_resolved_frames(ssr, low, request_for(case, SEED, ""))
        bicubic = bicubic_upsample(low, scale)
        ssr_scores.append(psnr(upsampled, high))
        bicubic_scores.append(psnr(bicubic, high))
        detail_ratios.append(high_frequency_energy(upsampled) / high_frequency_energy(high))
    return [
        "## tsr and ssr against the truth (rendered clips)",
        "",
        f"The first {count} cases' clips drawn by the world, 17 frames at 128² (module docstring, 2).",
        "",
        "| stage | method | PSNR (dB, mean) |",
        "|---|---|---|",
        f"| tsr ×{factor}, frames between | `stages.tsr` ({tsr.config.interpolator}) | {np.mean(tsr_scores):.2f} |",
        f"| tsr ×{factor}, frames between | linear blending | {np.mean(blend_scores):.2f} |",
        f"| ssr ×{scale} | `stages.ssr` (high-frequency energy {np.mean(detail_ratios):.2f}× the truth's) | "
        f"{np.mean(ssr_scores):.2f} |",
        f"| ssr ×{scale} | bicubic | {np.mean(bicubic_scores):.2f} |",
        "",
    ]


def obeyed_with_seeds(base: BaseStage, tsr: TsrStage, config, cases: list[PromptCase], seed: int) -> list[bool]:
    """Whether each case's base clip has the prompt's colour and direction, with seeds seed + index."""
    flags = []
    for index, case in enumerate(cases):
        _, frames = base_frames(base, tsr, request_in_config(case, seed + index, config))
        flags.append(check_base_clip(frames, case).passed)
    return flags


def cascade(base: BaseStage, tsr: TsrStage, ssr: SsrStage, config, cases, later_stages: int, threads: int,
            overrides: list[str], other_seeds: list[int]) -> list[str]:
    """The cascade on the cases' prompts: base clip checks, tsr monotonicity, ssr detail, and the
    base clip checks again with other seeds."""
    video = config.video
    rows, base_monotonic, monotonic, energy_ratios, seconds = [], [], [], [], []
    for index, case in enumerate(cases):
        request = request_in_config(case, SEED + index, config)
        started = time.perf_counter()
        latents, frames = base_frames(base, tsr, request)
        seconds.append(time.perf_counter() - started)
        check = check_base_clip(frames, case)
        rows.append(check)
        print(f"{'ok ' if check.passed else 'BAD'} {case.prompt!r}: {check.colour} {check.direction} "
              f"({check.motion:.0f} px)", flush=True)
        if check.passed and len(base_monotonic) < later_stages:
            base_monotonic.append(is_monotonic(frames, case.direction))
            if base_monotonic[-1]:
                monotonic.append(is_monotonic(interpolated_frames(tsr, latents, request), case.direction))
        if len(energy_ratios) < later_stages:
            energy_ratios.append(detail_over_bicubic(ssr, frames, request))
    obeyed = {SEED: [row.passed for row in rows]}
    for seed in other_seeds:
        obeyed[seed] = obeyed_with_seeds(base, tsr, config, cases, seed)
        print(f"seeds {seed} + index: both {rate(obeyed[seed])}", flush=True)
    base_config = config.stages.base
    return [
        "## The cascade",
        "",
        f"- config: `configs/tiny.yaml`{''.join(f' `{item}`' for item in overrides)} ({video.height}×{video.width}, {video.num_frames} frames, {base_config.steps} "
        f"{base_config.sampler} steps, guidance {base_config.guidance_scale}, shift {base_config.shift}); seeds {SEED} + index",
        f"- base stage + VAE decode: {np.median(seconds):.2f} s per prompt (median, {threads} threads)",
        "",
        "| check | rate |",
        "|---|---|",
        f"| colour matches (hue) | {rate(row.colour_matches for row in rows)} |",
        f"| direction matches (centroid) | {rate(row.direction_matches for row in rows)} |",
        f"| **both** | **{rate(row.passed for row in rows)}** |",
        f"| both, English prompts | {rate(row.passed for row in rows if not is_chinese(row.case.prompt))} |",
        f"| both, Chinese prompts | {rate(row.passed for row in rows if is_chinese(row.case.prompt))} |",
        f"| base clip monotonic (of the first {len(base_monotonic)} obeyed clips) | {rate(base_monotonic)} |",
        f"| tsr output monotonic (of the {len(monotonic)} of those whose base clip is) | {rate(monotonic)} |",
        f"| ssr high-frequency energy above bicubic (of the first {len(energy_ratios)} clips) | "
        f"{rate(ratio > 1 for ratio in energy_ratios)} (median ratio {np.median(energy_ratios):.2f}) |",
        *[f"| both, seeds {seed} + index | {rate(flags)} |" for seed, flags in obeyed.items() if seed != SEED],
        *([f"| **both, the {len(obeyed)} seed sets pooled** | **{rate(sum(obeyed.values(), []))}** |"]
          if len(obeyed) > 1 else []),
        "",
        "Failures:",
        "",
        *([f"- {row.case.prompt!r} (wanted {row.case.colour}, {row.case.direction}): measured {row.colour}, "
           f"{row.direction}, {row.motion:.0f} px" for row in rows if not row.passed] or ["- none"]),
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--later-stages", type=int, default=16,
                        help="how many clips the tsr and ssr checks run on (the first ones)")
    parser.add_argument("--other-seeds", type=int, nargs="*", default=list(OTHER_SEEDS),
                        help=f"first seeds of further seed sets for the colour and direction checks (default {' '.join(map(str, OTHER_SEEDS))})")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    config = load_config(None, arguments.overrides)
    base, tsr, ssr = BaseStage(config.stages.base), TsrStage(config.stages.tsr), SsrStage(config.stages.ssr)
    cases = held_out_prompts(arguments.prompts)
    lines = [
        "# The tiny cascade on the procedural world: evaluation",
        "",
        "Written by `python bench/eval_world.py`; the method is in its docstring.",
        "",
        f"Cases: {len(cases)} held-out single-object prompts (`stages.world.held_out_prompts`), in phrasings "
        f"no model saw in training, {sum(is_chinese(case.prompt) for case in cases)} of them Chinese.",
        "",
        *vae_round_trip(tsr, cases),
        *stages_on_rendered_clips(tsr, ssr, cases, arguments.later_stages),
    ]
    random_models = base.warnings + tsr.warnings + ssr.warnings
    if random_models:
        lines += ["## The cascade", "", "Not measured: " + "; ".join(random_models) + ".", ""]
    else:
        lines += cascade(base, tsr, ssr, config, cases, arguments.later_stages, arguments.threads,
                         arguments.overrides, arguments.other_seeds)
    notes = ""
    if DOC_PATH.is_file() and NOTES_HEADING in DOC_PATH.read_text():
        notes = DOC_PATH.read_text()[DOC_PATH.read_text().index(NOTES_HEADING):]
    write_atomic(DOC_PATH, ("\n".join(lines) + ("\n" + notes if notes else "")).encode())
    print("\n".join(lines))
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
