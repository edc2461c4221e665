"""Evaluates frame interpolators on held-out clips and writes docs/eval_tsr.md. Run from the
repository root:

    python bench/eval_tsr.py [--weights weights/tsr/interpolator.safetensors]

Data: synthetic clips (stages.training_data.synthetic_clip) of the held-out photos, which no
training run sees, CLIPS_PER_PHOTO per photo from fixed seeds, SIZE × SIZE pixels, at most
MAX_MOTION pixels of motion per frame step, with the next held-out photo as overlay source. For ×2
a clip has 3 frames: frames 0 and 2 are the inputs, frame 1 the truth at t = 1/2 (up to 2·MAX_MOTION
pixels of motion between the inputs). For ×3 a clip has 4 frames: inputs 0 and 3, truths 1 and 2 at
t = 1/3 and 2/3 (up to 3·MAX_MOTION pixels).

Metrics on the uint8 frames the stage would output, RGB, whole frame:
- PSNR (mean over frames of the per-frame PSNR, peak 255);
- SSIM (Wang et al. 2004: Gaussian window σ = 1.5, data range 255, colour channels averaged).
Speed: interpolated frames per second on the CPU with one thread, 256 × 256, SPEED_PAIRS pairs at
t = 1/2, best of SPEED_REPEATS runs, for the two flow-based methods.

Methods: frame repetition (the nearer input, frame 0 on a tie: what a player does), linear blending
((1 − t)·frame 0 + t·frame 1), the classical-flow interpolator and the learned one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from stages.pixels import to_model_range, to_uint8  # noqa: E402
from stages.training_data import HELD_OUT_PHOTOS, load_photo, synthetic_clip  # noqa: E402
from stages.tsr.interpolator import ClassicalFlowInterpolator, blend_linearly  # noqa: E402
from stages.tsr.learned import LearnedInterpolator  # noqa: E402
from stages.training import RECORD_NAME  # noqa: E402

SIZE = 256
MAX_MOTION = 8.0  # pixels per frame step
CLIPS_PER_PHOTO = 4
EVAL_SEED = 4242
FACTORS = {2: 3, 3: 4}  # factor -> frames per clip
SPEED_PAIRS = 4
SPEED_REPEATS = 2
TARGETS_DB = {"linear blending": 5.0, "classical flow": 1.0}  # learned PSNR over these at ×2
DEFAULT_WEIGHTS = REPOSITORY_ROOT / "weights" / "tsr" / "interpolator.safetensors"
DOC_PATH = REPOSITORY_ROOT / "docs" / "eval_tsr.md"
NOTES_HEADING = "## Notes"  # a hand-written section of the doc from this heading on is kept

Interpolator = Callable[[torch.Tensor, torch.Tensor, list[float]], torch.Tensor]


def repeat_nearest(frame0: torch.Tensor, frame1: torch.Tensor, times: list[float]) -> torch.Tensor:
    return torch.stack([frame0 if t <= 0.5 else frame1 for t in times])


def held_out_clips(num_frames: int) -> np.ndarray:
    """(N, num_frames, SIZE, SIZE, 3) uint8, the same on every run."""
    clips = []
    for photo_index, name in enumerate(HELD_OUT_PHOTOS):
        photo = load_photo(name)
        overlay_photo = load_photo(HELD_OUT_PHOTOS[(photo_index + 1) % len(HELD_OUT_PHOTOS)])
        for clip_index in range(CLIPS_PER_PHOTO):
            rng = np.random.default_rng([EVAL_SEED, num_frames, photo_index, clip_index])
            clips.append(synthetic_clip(photo, num_frames, SIZE, rng, MAX_MOTION, overlay_photo))
    return np.stack(clips)


def as_model_frames(frames: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 → (N, 3, H, W) float in [-1, 1]."""
    return to_model_range(torch.from_numpy(frames)).permute(0, 3, 1, 2).contiguous()


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    return float(structural_similarity(
        image, reference, channel_axis=-1, data_range=255, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    ))


@torch.no_grad()
def score(interpolator: Interpolator, clips: np.ndarray, batch: int = 4) -> tuple[float, float]:
    """Mean PSNR and SSIM of the frames between the first and last of every clip."""
    count = clips.shape[1] - 1
    times = [step / count for step in range(1, count)]
    psnrs, ssims = [], []
    for start in range(0, len(clips), batch):
        group = clips[start : start + batch]
        middles = interpolator(as_model_frames(group[:, 0]), as_model_frames(group[:, -1]), times)
        middles = to_uint8(middles).permute(0, 1, 3, 4, 2).numpy()  # (len(times), B, H, W, 3)
        for step in range(len(times)):
            for clip, frame in zip(group, middles[step]):
                psnrs.append(psnr(frame, clip[step + 1]))
                ssims.append(ssim(frame, clip[step + 1]))
    return float(np.mean(psnrs)), float(np.mean(ssims))


@torch.no_grad()
def frames_per_second(interpolator: Interpolator) -> float:
    generator = torch.Generator().manual_seed(0)
    frame0 = torch.rand(SPEED_PAIRS, 3, 256, 256, generator=generator) * 2 - 1
    frame1 = torch.roll(frame0, shifts=(3, -5), dims=(2, 3))
    interpolator(frame0[:1], frame1[:1], [0.5])  # warm-up
    best = float("inf")
    for _ in range(SPEED_REPEATS):
        started = time.perf_counter()
        interpolator(frame0, frame1, [0.5])
        best = min(best, time.perf_counter() - started)
    return SPEED_PAIRS / best


def training_section(weights: Path) -> list[str]:
    record_path = weights.parent / RECORD_NAME
    if not record_path.exists():
        return [f"No training record beside {weights.name}."]
    record = json.loads(record_path.read_text())
    config = record["config"]
    losses = ", ".join(f"{key} {value}" for key, value in record["final_losses"].items())
    return [
        f"- command: `{record['command']}`",
        f"- data: {record['data']}",
        f"- steps: {config['training']['steps']} (batch {config['training']['batch_size']}, "
        f"{config['crop_size']}×{config['crop_size']} crops, clips of 7 frames, at most "
        f"{config['max_motion']} px per frame step), {config['training']['threads']} CPU thread",
        f"- wall time: {record['wall_seconds_of_this_invocation'] / 60:.1f} min",
        f"- final losses (mean of the last 5 logged): {losses}",
        f"- parameters: {record['parameters']:,}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    parser.add_argument("--no-doc", action="store_true", help=f"print only; do not write {DOC_PATH.name}")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(1)

    methods: dict[str, Interpolator] = {
        "frame repetition": repeat_nearest,
        "linear blending": blend_linearly,
        "classical flow": ClassicalFlowInterpolator(),
        "learned": LearnedInterpolator.from_pretrained(str(arguments.weights)),
    }
    results: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in methods}
    for factor, num_frames in FACTORS.items():
        clips = held_out_clips(num_frames)
        for name, interpolator in methods.items():
            results[name][factor] = score(interpolator, clips)
            print(f"×{factor} {name}: PSNR {results[name][factor][0]:.2f} dB, SSIM {results[name][factor][1]:.4f}", flush=True)
    speeds = {name: frames_per_second(methods[name]) for name in ("classical flow", "learned")}

    table = [
        "| method | ×2 PSNR (dB) | ×2 SSIM | ×3 PSNR (dB) | ×3 SSIM | CPU frames/s at 256² |",
        "|---|---|---|---|---|---|",
    ]
    for name in methods:
        speed = f"{speeds[name]:.2f}" if name in speeds else "—"
        table.append(
            f"| {name} | {results[name][2][0]:.2f} | {results[name][2][1]:.4f} | "
            f"{results[name][3][0]:.2f} | {results[name][3][1]:.4f} | {speed} |"
        )
    learned = results["learned"][2][0]
    targets = []
    for baseline, margin in TARGETS_DB.items():
        gain = learned - results[baseline][2][0]
        verdict = "met" if gain >= margin else "MISSED"
        targets.append(f"- learned over {baseline} at ×2: {gain:+.2f} dB (target ≥ +{margin:.0f} dB): {verdict}")
    print("\n".join(table + [""] + targets))

    if not arguments.no_doc:
        clips_total = CLIPS_PER_PHOTO * len(HELD_OUT_PHOTOS)
        weights = arguments.weights.resolve()
        weights_name = weights.relative_to(REPOSITORY_ROOT) if weights.is_relative_to(REPOSITORY_ROOT) else weights.name
        lines = [
            "# Frame interpolation (tsr): evaluation",
            "",
            "Written by `python bench/eval_tsr.py`; the method is described at the top of that file.",
            "",
            f"Held-out photos: {', '.join(HELD_OUT_PHOTOS)} ({clips_total} clips per factor, {SIZE}×{SIZE}, "
            f"seed {EVAL_SEED}, at most {MAX_MOTION:g} px of motion per frame step, so up to "
            f"{2 * MAX_MOTION:g} px between the inputs at ×2 and {3 * MAX_MOTION:g} px at ×3). "
            f"Learned weights: `{weights_name}`. Speed: 1 CPU thread, {torch.__version__}.",
            "",
            *table,
            "",
            *targets,
            "",
            "## Training of the shipped weights",
            "",
            *training_section(arguments.weights),
            "",
        ]
        previous = DOC_PATH.read_text() if DOC_PATH.exists() else ""
        marker = f"\n{NOTES_HEADING}\n"
        notes = f"{NOTES_HEADING}\n{previous.split(marker, 1)[1]}" if marker in previous else ""
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text("\n".join(lines) + (f"\n{notes}" if notes else ""))
        print(f"wrote {DOC_PATH.relative_to(REPOSITORY_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
