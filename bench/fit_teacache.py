"""Fits TeaCache's rescaling polynomial for a cascade config's DiT from a few sampling runs without
the cache, and prints it as the value of `stages.base.teacache.coefficients`. From the repository root:

    python bench/fit_teacache.py [--config FILE] [--prompt TEXT ...] [--seeds 2] [--steps 10 20 40] [key=value ...]

Each run samples one prompt with one seed at one step count (the config's sampler, shift, guidance
and video size; TeaCache off). At every step after the first, hooks on the DiT record the relative
L1 change since the previous step of its time modulation (what the cache measures at run time) and
of its output (the velocity of the guidance pair: what reusing the blocks would get wrong); a
least-squares polynomial of degree 4 maps the first to the second (stages.base.teacache.fit_coefficients),
as TeaCache fits its published ones. The time modulation depends on the timestep alone, so several
step counts are what spread the recorded changes over the range the cache meets; prompts and seeds
spread the outputs. Without --prompt, captions of the procedural world (stages/world.py) in its
training phrasings are used, never the held-out ones the evaluation reads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cascade.config import load_config  # noqa: E402
from cascade.payload import Request  # noqa: E402
from stages.base.stage import BaseStage  # noqa: E402
from stages.base.teacache import fit_coefficients, record_changes  # noqa: E402
from stages.world import caption, random_clip  # noqa: E402

FIRST_SEED = 100  # seeds of the runs: FIRST_SEED + index (the evaluation uses 1234, 5000, 9000 + index)


def world_prompts(count: int) -> list[str]:
    """`count` single-object captions of the world in its training phrasings, alternating languages."""
    rng = np.random.default_rng(FIRST_SEED)
    return [caption(random_clip(rng, 17, two_object_share=0.0), rng, "train", ("en", "zh")[index % 2])
            for index in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a cascade config (default configs/tiny.yaml)")
    parser.add_argument("--prompt", action="append", help="a prompt to sample (repeatable; default 4 world captions)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt and step count")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40], help="step counts to sample with")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    config = load_config(arguments.config, [*arguments.overrides, "stages.base.teacache.threshold=0"])
    base, video = BaseStage(config.stages.base), config.video
    prompts = arguments.prompt or world_prompts(4)
    modulation_changes, output_changes = [], []
    started = time.perf_counter()
    for steps in arguments.steps:
        base.config.steps = steps
        for index, prompt in enumerate(prompts):
            for seed in range(FIRST_SEED + index * arguments.seeds, FIRST_SEED + (index + 1) * arguments.seeds):
                modulation, output, remove = record_changes(base.dit)
                base(None, Request(prompt, config.stages.base.negative_prompt, seed, video.height, video.width,
                                   video.num_frames, video.fps))
                remove()
                modulation_changes += modulation
                output_changes += output
    coefficients = fit_coefficients(modulation_changes, output_changes)
    fitted = np.polyval(coefficients, modulation_changes)
    residual = float(np.sqrt(np.mean((fitted - np.array(output_changes)) ** 2)))
    runs = len(arguments.steps) * len(prompts) * arguments.seeds
    print(f"{runs} runs ({len(prompts)} prompts x {arguments.seeds} seeds x steps {arguments.steps}), "
          f"{len(output_changes)} step pairs, {time.perf_counter() - started:.0f} s")
    print(f"modulation change {min(modulation_changes):.4f} .. {max(modulation_changes):.4f}; output change "
          f"{min(output_changes):.4f} .. {max(output_changes):.4f}, mean {np.mean(output_changes):.4f}; "
          f"fit RMS error {residual:.4f}")
    print(f"stages.base.teacache.coefficients: [{', '.join(f'{value:.8e}' for value in coefficients)}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
