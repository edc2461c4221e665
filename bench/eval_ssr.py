"""Evaluates the shipped wavelet upsamplers against bicubic and Lanczos on held-out clips, and
writes docs/eval_ssr.md. Run from the repository root:

    python bench/eval_ssr.py

Data: synthetic clips (stages.training_data.synthetic_clip) of the held-out photos, which no
training run sees: CLIPS_PER_PHOTO clips of NUM_FRAMES frames of SIZE x SIZE per photo, from fixed
seeds. The clips are longer than the training clips, so the recurrence runs past what it was
trained on.

Degradation: the low-resolution input is the area (box) average of scale x scale pixel blocks of the
ground truth, rounded to uint8 as frames travel between stages. With the haar wavelet the true low
band of a high-resolution frame is exactly 2x its 2x2 area average, so this is the degradation the
upsampler's structure assumes and its detail bands have an exact target (up to the rounding).

Metrics, on luma only (ITU-R BT.601 Y in studio range 16..235, the usual super-resolution
convention), with `scale` pixels cropped from every border:
- PSNR (mean over frames of the per-frame PSNR, peak 255);
- SSIM (Wang et al. 2004: Gaussian window sigma 1.5, data range 255), mean over frames;
- flicker: the mean absolute change of the error (output Y - true Y) from one frame to the next, in
  Y levels; a method whose error moves with the content scores low, one whose error jumps scores high.
Speed: frames per second of each method on the CPU with one thread, 256x256 input frames.

Methods: bicubic and Lanczos (Pillow's resize from the uint8 input), the learned upsampler run as
the stage runs it (frames in order, each seeing the previous frame's output), and the same weights
with every frame treated as a first frame (no recurrence), to show what the recurrence adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402

from stages.pixels import to_model_range, to_uint8  # noqa: E402
from stages.ssr.stage import SsrStageConfig, load_upsampler, weights_path  # noqa: E402
from stages.ssr.upsampler import WaveletUpsampler, WaveletUpsamplerConfig, upsample_frames  # noqa: E402
from stages.training_data import HELD_OUT_PHOTOS, load_photo, synthetic_clip  # noqa: E402

SCALES = (2, 4)
SIZE = 256  # side of the ground-truth frames
NUM_FRAMES = 10
CLIPS_PER_PHOTO = 3
EVAL_SEED = 2024
SPEED_INPUT_SIDE = 256
SPEED_FRAMES = 4
TARGETS_DB = {2: 1.5, 4: 0.8}  # learned PSNR over bicubic
DOC_PATH = REPOSITORY_ROOT / "docs" / "eval_ssr.md"


# ---------------------------------------------------------------------------------------------------
# Data and methods (uint8 frames (T, H, W, 3) in and out)


def held_out_clips() -> list[np.ndarray]:
    clips = []
    for photo_index, name in enumerate(HELD_OUT_PHOTOS):
        photo = load_photo(name)
        for clip_index in range(CLIPS_PER_PHOTO):
            rng = np.random.default_rng([EVAL_SEED, photo_index, clip_index])
            clips.append(synthetic_clip(photo, NUM_FRAMES, SIZE, rng))
    return clips


def area_downsample(frames: np.ndarray, scale: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H/scale, W/scale, 3) uint8, the mean of each scale x scale block."""
    count, height, width, _ = frames.shape
    blocks = frames.reshape(count, height // scale, scale, width // scale, scale, 3).astype(np.float64)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


def pillow_resize(frames: np.ndarray, scale: int, resample: int) -> np.ndarray:
    height, width = frames.shape[1:3]
    size = (width * scale, height * scale)
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, resample)) for frame in frames])


@torch.no_grad()
def learned(frames: np.ndarray, upsampler: WaveletUpsampler, recurrent: bool = True) -> np.ndarray:
    inputs = [to_model_range(torch.from_numpy(frame).permute(2, 0, 1)[None]) for frame in frames]
    if recurrent:
        outputs = list(upsample_frames(upsampler, inputs))
    else:
        outputs = [upsampler(frame)[0] for frame in inputs]
    return np.stack([to_uint8(output[0]).permute(1, 2, 0).numpy() for output in outputs])


# ---------------------------------------------------------------------------------------------------
# Metrics


def luma(frames: np.ndarray) -> np.ndarray:
    """BT.601 Y in studio range [16, 235] of uint8 RGB (..., 3), float64."""
    rgb = frames.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def scores(output: np.ndarray, truth: np.ndarray, border: int) -> dict[str, float]:
    """PSNR, SSIM and flicker of one clip (T, H, W, 3) on luma, `border` pixels cropped."""
    crop = (slice(None), slice(border, -border), slice(border, -border))
    predicted, target = luma(output)[crop], luma(truth)[crop]
    mse = ((predicted - target) ** 2).mean(axis=(1, 2))
    psnr = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))
    ssim = [
        structural_similarity(p, t, data_range=255.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for p, t in zip(predicted, target)
    ]
    error = predicted - target
    flicker = np.abs(error[1:] - error[:-1]).mean()
    return {"psnr": float(psnr.mean()), "ssim": float(np.mean(ssim)), "flicker": float(flicker)}


def frames_per_second(method, frames: np.ndarray) -> float:
    method(frames[:1])  # warm-up
    started = time.perf_counter()
    method(frames)
    return len(frames) / (time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------


def evaluate() -> tuple[dict, dict]:
    torch.set_num_threads(1)
    clips = held_out_clips()
    speed_frames = np.random.default_rng(EVAL_SEED).integers(
        0, 256, (SPEED_FRAMES, SPEED_INPUT_SIDE, SPEED_INPUT_SIDE, 3), dtype=np.uint8
    )
    results, weights = {}, {}
    for scale in SCALES:
        config = SsrStageConfig(upsampler=WaveletUpsamplerConfig(scale=scale))
        weights[scale] = str(Path(weights_path(config)).relative_to(REPOSITORY_ROOT))
        upsampler = load_upsampler(config, warnings=[])
        methods = {
            "bicubic (PIL)": lambda frames: pillow_resize(frames, scale, Image.BICUBIC),
            "Lanczos (PIL)": lambda frames: pillow_resize(frames, scale, Image.LANCZOS),
            "learned, per frame (no recurrence)": lambda frames: learned(frames, upsampler, recurrent=False),
            "learned (recurrent, as the stage runs)": lambda frames: learned(frames, upsampler),
        }
        for name, method in methods.items():
            per_clip = [scores(method(area_downsample(clip, scale)), clip, border=scale) for clip in clips]
            row = {key: float(np.mean([clip_scores[key] for clip_scores in per_clip])) for key in per_clip[0]}
            row["fps"] = frames_per_second(method, speed_frames)
            results[(scale, name)] = row
            print(f"x{scale} {name}: {row}", flush=True)
    return results, weights


def training_section() -> list[str]:
    lines = ["## Training", ""]
    for scale in SCALES:
        record_path = REPOSITORY_ROOT / "weights" / "ssr" / f"upsampler_x{scale}.json"
        if not record_path.exists():
            lines += [f"- x{scale}: no training record at weights/ssr/upsampler_x{scale}.json", ""]
            continue
        record = json.loads(record_path.read_text())
        config = record["config"]
        losses = ", ".join(f"{key} {value:.4f}" for key, value in record["final_losses"].items())
        lines += [
            f"### x{scale}",
            "",
            f"- command: `{record['command']}`",
            f"- data: {record['data']}; clips of {config['clip_frames']} frames, {config['crop_size']}x"
            f"{config['crop_size']} high-resolution crops, batch {config['training']['batch_size']}, "
            f"motion up to {config['max_motion']} px/frame",
            f"- started from: {record['init'] or 'random initialisation'}",
            f"- steps: {config['training']['steps']}, peak learning rate {config['training']['learning_rate']}, "
            f"wall time {record['wall_seconds_of_this_invocation'] / 60:.1f} min on 1 CPU thread",
            f"- final losses (mean of the last 5 logged steps): {losses}",
            "",
        ]
    return lines


def write_doc(results: dict, weights: dict) -> str:
    lines = [
        "# Spatial super-resolution: evaluation",
        "",
        "Written by `python bench/eval_ssr.py`; see its docstring for the method in full.",
        "",
        f"- data: held-out photos {', '.join(HELD_OUT_PHOTOS)} (never in training), {CLIPS_PER_PHOTO} synthetic "
        f"clips each of {NUM_FRAMES} frames at {SIZE}x{SIZE}, camera motion up to 8 px/frame plus moving "
        f"occluders, seeds fixed ({EVAL_SEED}, photo, clip)",
        "- degradation: area (box) average of scale x scale blocks, rounded to uint8. For haar, the true "
        "low band of a frame is exactly 2x its 2x2 area average, so the detail bands the upsampler predicts "
        "have an exact target; training uses the same degradation (the wavelet low band over its gain, "
        "which for haar is the area average)",
        "- metrics on BT.601 luma (Y in 16..235), `scale` pixels cropped at every border; flicker is the mean "
        "absolute frame-to-frame change of the error, in Y levels (lower is better)",
        f"- speed: frames/s on the CPU, 1 thread, {SPEED_INPUT_SIDE}x{SPEED_INPUT_SIDE} input (x4: 1024x1024 "
        "output); on a shared machine these vary from run to run",
        f"- weights: {', '.join(f'x{scale} `{path}`' for scale, path in weights.items())}",
        "",
        "## Model",
        "",
        "Per 2x level, the input frame (times the haar low-band gain 2) IS the output's low band; a residual "
        "conv network (32 channels, 4 blocks, about 81k parameters per level; x4 has two levels with their "
        "own weights) predicts the three detail bands, and the inverse DWT assembles the frame. So the "
        "output's area average is the input by construction. Against flicker the network is recurrent: "
        "each level also sees the previous frame's output bands at that level (previous frame plus the "
        "detail drawn for it), so it can keep detail consistent from frame to frame. No optical flow: "
        "the classical flow of stages/tsr would cost more than the upsampler, and the network's "
        "receptive field (21 px) covers the motion of a few pixels per frame at the input resolution. "
        "The price is that frames of a video are processed in order (the stage batches the videos of a "
        "clip instead).",
        "",
        "## Results",
        "",
        "| scale | method | PSNR (dB) | SSIM | flicker | frames/s |",
        "|---|---|---|---|---|---|",
    ]
    for (scale, name), row in results.items():
        lines.append(
            f"| x{scale} | {name} | {row['psnr']:.2f} | {row['ssim']:.4f} | {row['flicker']:.3f} | {row['fps']:.2f} |"
        )
    lines += ["", "## Targets", ""]
    for scale in SCALES:
        bicubic = results[(scale, "bicubic (PIL)")]
        ours = results[(scale, "learned (recurrent, as the stage runs)")]
        gain = ours["psnr"] - bicubic["psnr"]
        psnr_met = gain >= TARGETS_DB[scale]
        flicker_met = ours["flicker"] <= bicubic["flicker"]
        lines.append(
            f"- x{scale}: learned - bicubic = {gain:+.2f} dB (target +{TARGETS_DB[scale]} dB: "
            f"{'met' if psnr_met else 'MISSED'}); flicker {ours['flicker']:.3f} vs bicubic {bicubic['flicker']:.3f} "
            f"(target: no worse: {'met' if flicker_met else 'MISSED'})"
        )
    for scale in SCALES:
        per_frame = results[(scale, "learned, per frame (no recurrence)")]
        ours = results[(scale, "learned (recurrent, as the stage runs)")]
        lines.append(
            f"- x{scale}, what the recurrence adds over the same weights run frame by frame: "
            f"{ours['psnr'] - per_frame['psnr']:+.3f} dB, flicker {ours['flicker'] - per_frame['flicker']:+.3f}"
        )
    lines += [""] + training_section()
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", type=Path, default=DOC_PATH, help="where to write the report (default docs/eval_ssr.md)")
    arguments = parser.parse_args()
    results, weights = evaluate()
    document = write_doc(results, weights)
    print(document)
    arguments.doc.parent.mkdir(parents=True, exist_ok=True)
    arguments.doc.write_text(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
