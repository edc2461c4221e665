"""Upsamples any video with the wavelet upsampler, outside the cascade.

    python -m stages.ssr IN.mp4 OUT.mp4 --scale 2 [--weights PATH] [--device cuda]

OUT is written atomically, H.264 at the input's frame rate. Without --weights the shipped weights
for the scale are used. Errors in what was given (missing file, not a video, a scale other than 2
or 4, a video smaller than 8x8) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cascade.errors import UserError
from cascade.outputs import write_atomic
from cascade.video import encode_mp4, read_video
from stages.pixels import to_model_range, to_uint8
from stages.ssr.stage import SHIPPED_WEIGHTS, SsrStageConfig, load_upsampler
from stages.ssr.upsampler import SUPPORTED_SCALES, WaveletUpsamplerConfig, upsample_frames
from stages.weights import WeightsError

MIN_SIDE = 8  # pixels; smaller inputs leave the network almost nothing to see


def upsample_video(frames: np.ndarray, config: SsrStageConfig, device: str) -> np.ndarray:
    """uint8 frames (T, H, W, 3) -> (T, scale·H, scale·W, 3), one frame at a time, in order."""
    warnings: list[str] = []
    upsampler = load_upsampler(config, warnings).to(device)
    inputs = (to_model_range(torch.from_numpy(frame).permute(2, 0, 1)[None].to(device)) for frame in frames)
    with torch.no_grad():
        return np.stack([to_uint8(output[0]).permute(1, 2, 0).cpu().numpy() for output in upsample_frames(upsampler, inputs)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ssr", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="a video file (anything FFmpeg reads)")
    parser.add_argument("output", type=Path, help="the MP4 to write")
    parser.add_argument("--scale", type=int, default=2, help="2 or 4 (default 2)")
    parser.add_argument("--weights", help=f"upsampler weights (default: the shipped {SHIPPED_WEIGHTS})")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    arguments = parser.parse_args(argv)
    try:
        if arguments.scale not in SUPPORTED_SCALES:
            raise UserError(f"--scale must be one of {sorted(SUPPORTED_SCALES)}, got {arguments.scale}")
        frames, fps = read_video(str(arguments.input))
        height, width = frames.shape[1:3]
        if height < MIN_SIDE or width < MIN_SIDE:
            raise UserError(f"{arguments.input} is {width}x{height}: the upsampler needs at least {MIN_SIDE}x{MIN_SIDE} pixels")
        weights = str(Path(arguments.weights).resolve()) if arguments.weights else SHIPPED_WEIGHTS
        config = SsrStageConfig(upsampler=WaveletUpsamplerConfig(scale=arguments.scale), weights=weights)
        upsampled = upsample_video(frames, config, arguments.device)
        write_atomic(arguments.output, encode_mp4(upsampled, fps))
    except (UserError, WeightsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {arguments.output}: {len(upsampled)} frames of {width * arguments.scale}x{height * arguments.scale} at {fps:g} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
