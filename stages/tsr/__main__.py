"""Raises the frame rate of any video file: the tsr stage's interpolator, without the cascade.

    python -m stages.tsr IN.mp4 OUT.mp4 --factor 3
    python -m stages.tsr IN.mov OUT.mp4 --factor 2 --method classical
    python -m stages.tsr IN.mp4 OUT.mp4 --weights runs/tsr/interpolator.safetensors

OUT is an H.264 MP4 at the input's frame rate × factor, holding every input frame unchanged and
factor − 1 new frames between each pair. It is written only once complete. Bad input is reported
on one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cascade.errors import UserError
from cascade.outputs import write_atomic
from cascade.video import encode_mp4, read_video
from stages.pixels import to_model_range, to_uint8
from stages.tsr.interpolator import MAX_FACTOR, interpolate_frames
from stages.tsr.stage import INTERPOLATORS, SHIPPED_WEIGHTS, TsrStageConfig, make_interpolator
from stages.weights import WeightsError

MIN_SIDE = 16
FRAMES_PER_CHUNK = 16  # input frames converted to float at a time, to bound memory on long videos


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.tsr", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a video file (anything FFmpeg reads)")
    parser.add_argument("output", type=Path, help="the MP4 to write")
    parser.add_argument("--factor", type=int, default=3, help=f"frame-rate multiplier, 1 to {MAX_FACTOR} (default 3)")
    parser.add_argument("--method", choices=INTERPOLATORS, default="learned", help="interpolator (default learned)")
    parser.add_argument("--weights", default=SHIPPED_WEIGHTS, help=f"learned weights (default {SHIPPED_WEIGHTS})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def check_frames(frames: np.ndarray, fps: float, name: Path) -> None:
    count, height, width = frames.shape[:3]
    if count < 2:
        raise UserError(f"{name} has {count} frame; interpolation needs at least 2")
    if height < MIN_SIDE or width < MIN_SIDE:
        raise UserError(f"{name} is {width}x{height}; frames must be at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if not fps > 0:
        raise UserError(f"{name} does not state its frame rate")


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """H.264 (yuv420p) needs even sizes: an odd side gets its last row or column repeated."""
    height, width = frames.shape[1:3]
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def interpolate_video(frames: np.ndarray, factor: int, interpolator, device: str) -> np.ndarray:
    """(T, H, W, 3) uint8 → ((T − 1)·factor + 1, H, W, 3) uint8, FRAMES_PER_CHUNK pairs at a time."""
    count = len(frames)
    output = np.empty(((count - 1) * factor + 1, *frames.shape[1:]), dtype=np.uint8)
    output[-1] = frames[-1]
    with tqdm(total=count - 1, desc=f"interpolating ×{factor}", unit="pair", file=sys.stderr) as bar:
        for start in range(0, count - 1, FRAMES_PER_CHUNK):
            stop = min(start + FRAMES_PER_CHUNK, count - 1)  # pairs start … stop − 1
            chunk = to_model_range(torch.from_numpy(frames[start : stop + 1]).to(device)).permute(0, 3, 1, 2)
            result = interpolate_frames(chunk, factor, interpolator)  # ((stop − start)·factor + 1, 3, H, W)
            output[start * factor : stop * factor] = to_uint8(result[:-1]).permute(0, 2, 3, 1).cpu().numpy()
            bar.update(stop - start)
    return output


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        if not 1 <= arguments.factor <= MAX_FACTOR:
            raise UserError(f"--factor must be an integer from 1 to {MAX_FACTOR}, got {arguments.factor}")
        frames, fps = read_video(str(arguments.input))
        check_frames(frames, fps, arguments.input)
        height, width = frames.shape[1:3]
        if height % 2 or width % 2:
            print(f"note: {width}x{height} is odd; H.264 needs even sizes, so the last row/column is repeated",
                  file=sys.stderr)
            frames = pad_to_even(frames)
        config = TsrStageConfig(interpolator=arguments.method, interpolator_weights=arguments.weights)
        warnings: list[str] = []
        interpolator = make_interpolator(config, warnings, arguments.device)
        with torch.no_grad():
            result = interpolate_video(frames, arguments.factor, interpolator, arguments.device)
        write_atomic(arguments.output, encode_mp4(result, fps * arguments.factor))
    except (UserError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot write {arguments.output}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {arguments.output}: {len(result)} frames at {fps * arguments.factor:g} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
