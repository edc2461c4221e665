"""TeaCache for the Wan DiT: skip the blocks on steps where the model's input has barely changed and
reuse the residual of the last full pass (Liu et al. 2024, "Timestep Embedding Tells: It's Time to
Cache for Video Diffusion Model"; the Wan2.1 variant of their TeaCache4Wan2.1).

At each sampler step the DiT computes its time modulation e0 = time_projection(time_embedding(t)),
(B, 6, dim). Its relative L1 change since the previous step, mean|e0 − e0_prev| / mean|e0_prev|,
rescaled by a polynomial fitted per model (numpy order, highest power first), estimates how much
the model's output changes; the estimates accumulate from step to step. While the sum stays under
`threshold`, the blocks are skipped and the input of the head is the step's embedded tokens plus
the residual (output − input of the blocks) of the last full pass; once it reaches the threshold,
the blocks run, the residual is renewed and the sum restarts at 0. The first `warmup_steps` and the
last step always run in full.

e0 depends on the timestep only, so the decision is the same for both halves of a guidance pair
(one decision per call, and the pair is one call) and on every rank of a sequence- or CFG-parallel
group (each rank computes the same e0 from the same timestep); the residual is kept per rank, for
its own shard of the tokens.

`fit_coefficients` fits the polynomial from sampling runs without the cache (bench/fit_teacache.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

COEFFICIENT_DEGREE = 4  # the degree of the published Wan2.1 polynomials


@dataclass
class TeaCacheConfig:
    """`stages.base.teacache`. A threshold of 0 turns the cache off (every step runs in full)."""

    threshold: float = 0.0  # skip while the accumulated rescaled change stays under this
    coefficients: list[float] = field(default_factory=list)  # rescaling polynomial, highest power first
    warmup_steps: int = 1  # the first steps always run in full (at least the first: nothing to reuse yet)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def validate(self, key: str = "stages.base.teacache") -> None:
        """Raises ValueError naming the first field that cannot work, and what is valid."""
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"{key}.threshold={self.threshold!r} is not valid: a number ≥ 0 (0 turns the cache off)")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(
                f"{key}.warmup_steps={self.warmup_steps!r} is not valid: an integer ≥ 1 (the first step has "
                "nothing to reuse)"
            )
        if self.enabled and (
            not self.coefficients or not all(math.isfinite(value) for value in self.coefficients)
        ):
            raise ValueError(
                f"{key}.coefficients={list(self.coefficients)!r} is not valid: at least one finite number, "
                "highest power first (fit them with bench/fit_teacache.py), when the threshold is above 0"
            )


def relative_l1_change(current: Tensor, previous: Tensor) -> float:
    """mean|current − previous| / mean|previous| (TeaCache's relative L1 distance)."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class TeaCache:
    """The cache of one sampling run of `steps` steps, one DiT call per step (a guidance pair is one
    call). Pass it to every DiT call of the run; make a new one for the next run."""

    def __init__(self, config: TeaCacheConfig, steps: int):
        self.config = config
        self.steps = steps
        self.step = 0  # index of the next call's step
        self.full_passes = 0  # calls that ran the blocks
        self.accumulated = 0.0  # rescaled change since the last full pass
        self.previous_modulation: Tensor | None = None  # (B, 6, dim) of the previous step
        self.residual: Tensor | None = None  # (B, L or L/P, dim) float32: blocks' output − input

    def reuses_residual(self, time_modulation: Tensor) -> bool:
        """Advances to the next step; whether that step skips the blocks. time_modulation: (B, 6, dim)."""
        if self.step >= self.steps:
            raise RuntimeError(f"TeaCache made for {self.steps} steps was called for step {self.step + 1}")
        step, previous = self.step, self.previous_modulation
        self.step += 1
        self.previous_modulation = time_modulation
        if step < self.config.warmup_steps or step == self.steps - 1:
            self.accumulated = 0.0
            return False
        self.accumulated += float(np.polyval(self.config.coefficients, relative_l1_change(time_modulation, previous)))
        if self.accumulated < self.config.threshold:
            return True
        self.accumulated = 0.0
        return False

    def __call__(self, x: Tensor, time_modulation: Tensor, blocks: Callable[[Tensor], Tensor]) -> Tensor:
        """The tokens after the DiT's blocks: `blocks(x)`, or x plus the last full pass's residual.

        x: (B, L or L/P, dim) float32, the embedded tokens of this step; time_modulation: (B, 6, dim)."""
        if self.reuses_residual(time_modulation):
            return x + self.residual
        out = blocks(x)
        self.residual = out - x
        self.full_passes += 1
        return out


def fit_coefficients(modulation_changes: list[float], output_changes: list[float],
                     degree: int = COEFFICIENT_DEGREE) -> list[float]:
    """Least-squares polynomial (highest power first) from the relative L1 change of the time
    modulation between consecutive steps to that of the DiT's output (as TeaCache fits its
    coefficients), from pairs recorded by sampling runs without the cache."""
    if len(modulation_changes) != len(output_changes) or len(modulation_changes) <= degree:
        raise ValueError(
            f"need more than {degree} pairs of changes of equal count to fit a degree-{degree} polynomial, got "
            f"{len(modulation_changes)} and {len(output_changes)}"
        )
    return [float(value) for value in np.polyfit(modulation_changes, output_changes, degree)]


def record_changes(dit: torch.nn.Module) -> tuple[list[float], list[float], Callable[[], None]]:
    """Hooks `dit` (a WanDiT) for one sampling run: at each call after the first, the relative L1
    change of its time modulation and of its output since the previous call. Returns the two lists
    (filled as the DiT runs) and a function that removes the hooks; hook each run anew, since its
    first call has no previous one."""
    modulation_changes: list[float] = []
    output_changes: list[float] = []
    previous: dict[str, Tensor] = {}

    def on_time_projection(module, inputs, output: Tensor) -> None:
        if "modulation" in previous:
            modulation_changes.append(relative_l1_change(output, previous["modulation"]))
        previous["modulation"] = output

    def on_dit(module, inputs, output: Tensor) -> None:
        if "output" in previous:
            output_changes.append(relative_l1_change(output, previous["output"]))
        previous["output"] = output

    handles = [dit.time_projection.register_forward_hook(on_time_projection), dit.register_forward_hook(on_dit)]

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return modulation_changes, output_changes, remove
