"""TeaCache on the tiny cascade: for each threshold, the DiT passes, the base stage's time, the
decoded clip's PSNR against the uncached one and the held-out obedience. From the repository root:

    python bench/bench_teacache.py [--thresholds 0 0.05 0.1] [--prompts 48] [--seeds 1234 5000 9000] [key=value ...]

Cases: `stages.world.held_out_prompts` (as bench/eval_world.py), each with seed `first + index` for
every first seed given. Each clip runs through the base stage of `configs/tiny.yaml` with
`stages.base.teacache.threshold` set to each threshold in turn (0: the cache off, the reference),
is decoded by the tsr stage's VAE and read back by `stages.world_checks.check_base_clip` (colour
and direction both right: "obeyed"). Time is the base stage's call alone (text encoding and
sampling, no decode), the median over clips, measured in this process with `--threads` torch
threads. Each clip runs at every threshold in turn before the next clip, so a change in the
machine's load falls on every row alike. PSNR compares the decoded uint8 frames of the cached and
the uncached clip of the same prompt and seed, averaged over clips (frames that are equal count as
100 dB).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.eval_world import psnr  # noqa: E402
from cascade.config import load_config  # noqa: E402
from cascade.payload import Clip, Request  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.tsr.stage import TsrStage  # noqa: E402
from stages.world import held_out_prompts  # noqa: E402
from stages.world_checks import base_frames, check_base_clip, request_in_config  # noqa: E402

SEEDS = (1234, 5000, 9000)  # bench/eval_world.py's seed sets


def timed(stage: BaseStage, seconds: list[float]) -> Callable[[Clip | None, Request], Clip]:
    """`stage` that appends the seconds of each call to `seconds`."""

    def call(clip: Clip | None, request: Request) -> Clip:
        started = time.perf_counter()
        output = stage(clip, request)
        seconds.append(time.perf_counter() - started)
        return output

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="first seed of each seed set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    config = load_config(None, arguments.overrides)
    base, tsr = BaseStage(config.stages.base), TsrStage(config.stages.tsr)
    if base.warnings + tsr.warnings:
        raise SystemExit("; ".join(base.warnings + tsr.warnings))
    cases = held_out_prompts(arguments.prompts)
    thresholds = sorted(set(arguments.thresholds) | {0.0})
    configs = {threshold: dataclasses.replace(config.stages.base, teacache=dataclasses.replace(
        config.stages.base.teacache, threshold=threshold)) for threshold in thresholds}
    seconds = {threshold: [] for threshold in thresholds}
    calls = {threshold: [] for threshold in thresholds}
    scores = {threshold: [] for threshold in thresholds if threshold > 0}
    obeyed = {(threshold, seed): [] for threshold in thresholds for seed in arguments.seeds}
    for seed in arguments.seeds:
        for index, case in enumerate(cases):
            request = request_in_config(case, seed + index, config)
            for threshold in thresholds:  # 0 first: the uncached clip the others are compared with
                base.config = configs[threshold]
                latents, frames = base_frames(timed(base, seconds[threshold]), tsr, request)
                calls[threshold].append(latents.notes["model_calls"])
                obeyed[threshold, seed].append(check_base_clip(frames, case).passed)
                if threshold == 0:
                    uncached = frames
                else:
                    scores[threshold].append(min(psnr(frames, uncached), 100.0))
        print(f"seed set {seed} done", flush=True)
    rows = []
    for threshold in thresholds:
        pooled = [flag for seed in arguments.seeds for flag in obeyed[threshold, seed]]
        rows.append((threshold, np.mean(calls[threshold]), statistics.median(seconds[threshold]),
                     np.mean(scores[threshold]) if threshold > 0 else None,
                     np.mean(obeyed[threshold, arguments.seeds[0]]), np.mean(pooled)))
    base_config = config.stages.base
    print(f"\n{len(cases)} held-out prompts x seed sets {arguments.seeds}; {base_config.steps} {base_config.sampler} "
          f"steps, guidance {base_config.guidance_scale}, shift {base_config.shift}; coefficients "
          f"{list(base_config.teacache.coefficients)}, warmup_steps {base_config.teacache.warmup_steps}; "
          f"{arguments.threads} torch thread(s)\n")
    print(f"| threshold | DiT passes of {base_config.steps} | base stage s per clip (median) | speed-up "
          f"| PSNR to uncached (dB) | obeyed, seeds {arguments.seeds[0]} + index | obeyed, {len(arguments.seeds)} seed sets |")
    print("|---|---|---|---|---|---|---|")
    reference_seconds = rows[0][2]
    for threshold, calls, seconds, score, first, pooled in rows:
        print(f"| {threshold:g}{' (off)' if threshold == 0 else ''} | {calls:.1f} | {seconds:.3f} "
              f"| {reference_seconds / seconds:.2f}× | {'—' if score is None else f'{score:.1f}'} "
              f"| {first:.1%} | {pooled:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
