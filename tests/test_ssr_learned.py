"""The recurrent wavelet upsampler, its training (losses, resume), the shipped weights against
bicubic, the stage, and the standalone `python -m stages.ssr` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import stages.ssr.training as ssr_training
from cascade.payload import Clip, Request
from cascade.video import encode_mp4, read_video
from stages.pixels import to_model_range, to_uint8
from stages.ssr import WaveletUpsampler, WaveletUpsamplerConfig, dwt2, idwt2, upsample_frames
from stages.ssr.__main__ import main as ssr_command
from stages.ssr.stage import SsrStage, SsrStageConfig, weights_path
from stages.ssr.training import (
    initialise_from,
    make_pairs,
    temporal_consistency_loss,
    true_detail_bands,
    upsampler_loss,
    wavelet_downsample,
)
from stages.training_data import HELD_OUT_PHOTOS, load_photo, synthetic_clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ["upsampler.channels=4", "upsampler.num_blocks=1", "training.batch_size=2", "crop_size=16", "clip_frames=2"]


def small_upsampler(scale: int, seed: int) -> WaveletUpsampler:
    """A small upsampler whose last layers are random, so it predicts detail and uses its state."""
    torch.manual_seed(seed)
    upsampler = WaveletUpsampler(WaveletUpsamplerConfig(channels=8, num_blocks=1, scale=scale))
    with torch.no_grad():
        for level in upsampler.levels:
            level.tail.weight.normal_(0, 0.1)
    return upsampler.eval()


def luma_psnr(output: np.ndarray, truth: np.ndarray, border: int) -> float:
    """BT.601 luma PSNR of uint8 (T, H, W, 3) arrays, `border` pixels cropped."""
    weights = np.array([65.481, 128.553, 24.966]) / 255.0
    error = ((output.astype(np.float64) - truth) @ weights)[:, border:-border, border:-border]
    return float(10 * np.log10(255.0**2 / np.mean(error**2)))


# ---------------------------------------------------------------------------------------------------
# The model


@pytest.mark.parametrize("scale", [2, 4])
def test_shapes_and_state_through_a_video(scale: int) -> None:
    upsampler = small_upsampler(scale, seed=0)
    frames = torch.rand(5, 2, 3, 6, 10, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (T, B, 3, H, W)
    with torch.no_grad():
        outputs = torch.stack(list(upsample_frames(upsampler, frames)))
        _, bands = upsampler(frames[0])
    assert outputs.shape == (5, 2, 3, scale * 6, scale * 10)
    assert [tuple(level.shape) for level in bands] == [(2, 3, 4, 6 * 2**k, 10 * 2**k) for k in range(len(bands))]

    # upsample_frames is the recurrence spelled out: frame t sees frame t-1's output bands
    with torch.no_grad():
        previous = None
        for frame, output in zip(frames, outputs):
            expected, previous = upsampler(frame, previous)
            torch.testing.assert_close(output, expected, rtol=0, atol=0)
        # the state matters: frame 1 comes out differently without it
        assert (upsampler(frames[1])[0] - outputs[1]).abs().max() > 1e-3
        # and each video of a batch has its own state: video 1 alone gives the same frames
        alone = torch.stack(list(upsample_frames(upsampler, frames[:, 1:2])))
    torch.testing.assert_close(alone[:, 0], outputs[:, 1], rtol=1e-5, atol=1e-6)


def test_state_of_the_wrong_shape_is_an_error() -> None:
    upsampler = small_upsampler(4, seed=2)
    with torch.no_grad():
        _, bands = upsampler(torch.zeros(1, 3, 8, 8))
        with pytest.raises(ValueError, match=r"level 0 must be shaped \(1, 3, 4, 6, 8\).*\(1, 3, 4, 8, 8\)"):
            upsampler(torch.zeros(1, 3, 6, 8), bands)
        with pytest.raises(ValueError, match=r"one tensor per level \(2\), got 1"):
            upsampler(torch.zeros(1, 3, 8, 8), bands[:1])


# ---------------------------------------------------------------------------------------------------
# Degradation and losses


def test_haar_degradation_is_the_area_average_and_detail_bands_are_exact() -> None:
    high = torch.rand(2, 3, 16, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    area = high.numpy().reshape(2, 3, 8, 2, 6, 2).mean(axis=(3, 5))  # independent: numpy block mean
    np.testing.assert_allclose(wavelet_downsample(high, "haar").numpy(), area, rtol=0, atol=1e-12)

    # x4: the two levels' targets rebuild the frame from its 4x4 area average, coarsest first
    low = torch.from_numpy(high.numpy().reshape(2, 3, 4, 4, 3, 4).mean(axis=(3, 5)))
    targets = true_detail_bands(high, levels=2, wavelet="haar")
    assert [tuple(t.shape) for t in targets] == [(2, 3, 3, 4, 3), (2, 3, 3, 8, 6)]
    image = low
    for details in targets:
        image = idwt2(torch.cat([2 * image.unsqueeze(2), details], dim=2), "haar")
    torch.testing.assert_close(image, high, rtol=0, atol=1e-12)


def test_make_pairs_layout() -> None:
    clips = np.random.default_rng(4).integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)  # (B, T, S, S, 3)
    low, high = make_pairs(clips, WaveletUpsamplerConfig(scale=4))
    assert low.shape == (3, 2, 3, 2, 2) and high.shape == (3, 2, 3, 8, 8)
    expected_high = clips[1, 2, :, :, 0] / 127.5 - 1  # video 1, frame 2, red
    np.testing.assert_allclose(high[2, 1, 0].numpy(), expected_high, atol=1e-6)
    np.testing.assert_allclose(low[2, 1, 0].numpy(), expected_high.reshape(2, 4, 2, 4).mean(axis=(1, 3)), atol=1e-6)


def test_temporal_consistency_loss_closed_form() -> None:
    generator = torch.Generator().manual_seed(5)
    targets = torch.rand(3, 1, 3, 6, 6, generator=generator)
    # a per-frame brightness offset leaves every spatial gradient, and so the loss, at zero
    offsets = torch.tensor([0.3, -0.2, 0.5]).view(3, 1, 1, 1, 1)
    assert temporal_consistency_loss(targets + offsets, targets).item() < 1e-6
    # a spike of height 1 in frame 1 only: its x gradient changes by ±1 at 2 places on the way in
    # (frames 0->1) and at the same 2 on the way out (1->2): 4 unit changes among the 2·3·6·5 changes
    # of the x gradient; the same for y; the loss is the mean of the two directions
    outputs = targets.clone()
    outputs[1, 0, 0, 2, 2] += 1.0
    expected = (4 / (2 * 3 * 6 * 5) + 4 / (2 * 3 * 5 * 6)) / 2
    torch.testing.assert_close(temporal_consistency_loss(outputs, targets), torch.tensor(expected))


def test_band_loss_is_zero_for_a_model_that_predicts_the_true_detail() -> None:
    clips = np.random.default_rng(6).integers(0, 256, (1, 2, 8, 8, 3), dtype=np.uint8)
    low, high = make_pairs(clips, WaveletUpsamplerConfig(scale=2))
    upsampler = WaveletUpsampler(WaveletUpsamplerConfig(channels=4, num_blocks=0, scale=2))
    true_bands = [dwt2(frame, "haar")[:, :, 1:] for frame in high]  # (1, 3, 3, 4, 4) per frame
    calls = iter(true_bands)
    upsampler.levels[0].forward = lambda frames, previous: next(calls)  # an oracle predictor
    loss, parts = upsampler_loss(upsampler, (low, high), temporal_weight=0.5)
    assert loss.item() < 1e-5 and max(parts.values()) < 1e-5
    assert set(parts) == {"l1_LH", "l1_HL", "l1_HH", "temporal"}


# ---------------------------------------------------------------------------------------------------
# Training


def read_run(out: Path) -> tuple[dict, dict]:
    weights = load_file(str(out / "upsampler_x2.safetensors"))
    optimizer = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    return weights, optimizer


def test_training_resumes_with_identical_state(tmp_path, monkeypatch) -> None:
    argv = ["--steps", "4", *TINY, "training.checkpoint_every=2", "training.log_every=1", "training.warmup_steps=1"]
    assert ssr_training.main(["--out", str(tmp_path / "straight"), *argv]) == 0
    straight_weights, straight_optimizer = read_run(tmp_path / "straight")
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)

    # interrupted after the checkpoint at step 2, then the same command again
    real_clip_batch = ssr_training.clip_batch

    def interrupted(step: int, *args, **kwargs):
        if step == 2:
            raise KeyboardInterrupt
        return real_clip_batch(step, *args, **kwargs)

    monkeypatch.setattr(ssr_training, "clip_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ssr_training.main(["--out", str(tmp_path / "resumed"), *argv])
    assert not (tmp_path / "resumed" / "upsampler_x2.safetensors").exists()
    monkeypatch.setattr(ssr_training, "clip_batch", real_clip_batch)
    assert ssr_training.main(["--out", str(tmp_path / "resumed"), *argv]) == 0

    resumed_weights, resumed_optimizer = read_run(tmp_path / "resumed")
    assert straight_weights.keys() == resumed_weights.keys()
    for key in straight_weights:
        torch.testing.assert_close(resumed_weights[key], straight_weights[key], rtol=0, atol=0)
    for index, state in straight_optimizer.items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed_optimizer[index][name], state[name], rtol=0, atol=0)
    # training changed the model, so the comparison above is not between two untouched models
    assert straight_weights["levels.0.tail.weight"].abs().max() > 0
    record = json.loads((tmp_path / "resumed" / "training_record.json").read_text())
    assert record["config"]["upsampler"]["channels"] == 4 and "l1_LH" in record["final_losses"]


def test_training_command_errors(tmp_path, capsys) -> None:
    assert ssr_training.main(["--out", str(tmp_path / "a"), "--scale", "3"]) == 2
    assert "--scale must be one of [2, 4], got 3" in capsys.readouterr().out
    assert ssr_training.main(["--out", str(tmp_path / "a"), "upsampler.nosuch=1"]) == 2
    assert "nosuch" in capsys.readouterr().out
    assert ssr_training.main(["--out", str(tmp_path / "a"), "crop_size=15"]) == 2
    assert "crop_size must be a multiple of the scale 2" in capsys.readouterr().out
    # a run folder holds one model: resuming it with another size is refused before anything loads
    assert ssr_training.main(["--out", str(tmp_path / "b"), "--steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert ssr_training.main(["--out", str(tmp_path / "b"), "--steps", "1", *TINY, "upsampler.channels=6"]) == 2
    assert "holds a run of another upsampler" in capsys.readouterr().out


def test_x2_weights_initialise_every_level_of_x4(tmp_path) -> None:
    source = small_upsampler(2, seed=7)
    save_file(source.state_dict(), str(tmp_path / "x2.safetensors"))
    target = WaveletUpsampler(WaveletUpsamplerConfig(channels=8, num_blocks=1, scale=4))
    initialise_from(target, str(tmp_path / "x2.safetensors"))
    for level in target.levels:
        for (name, value), expected in zip(level.state_dict().items(), source.levels[0].state_dict().values()):
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="missing keys"):
        initialise_from(WaveletUpsampler(WaveletUpsamplerConfig(channels=4, num_blocks=2, scale=2)), str(tmp_path / "x2.safetensors"))


# ---------------------------------------------------------------------------------------------------
# The shipped weights


def held_out_clip(size: int, seed: int) -> np.ndarray:
    photo = load_photo(HELD_OUT_PHOTOS[seed % len(HELD_OUT_PHOTOS)])
    return synthetic_clip(photo, 4, size, np.random.default_rng([seed, 99]))  # (4, size, size, 3)


def area_downsample(frames: np.ndarray, scale: int) -> np.ndarray:
    count, height, width, _ = frames.shape
    blocks = frames.reshape(count, height // scale, scale, width // scale, scale, 3).astype(np.float64)
    return np.round(blocks.mean(axis=(2, 4))).astype(np.uint8)


@pytest.mark.parametrize("scale", [2, 4])
def test_shipped_model_beats_bicubic_on_held_out_clips(scale: int) -> None:
    stage = SsrStage(SsrStageConfig(upsampler=WaveletUpsamplerConfig(scale=scale)))
    assert stage.warnings == [] and Path(weights_path(stage.config)).name == f"upsampler_x{scale}.safetensors"
    gains = []
    for seed in range(2):
        truth = held_out_clip(96, seed)
        low = area_downsample(truth, scale)
        size = (96, 96)
        bicubic = np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.BICUBIC)) for frame in low])
        request = Request("", "", 0, 96 // scale, 96 // scale, 4, 16.0)
        clip = stage(Clip(np.ascontiguousarray(low.transpose(3, 0, 1, 2)[None]), "pixel", 16.0, request), request)
        learned = clip.numpy()[0].transpose(1, 2, 3, 0)  # (T, H, W, 3)
        gains.append(luma_psnr(learned, truth, scale) - luma_psnr(bicubic, truth, scale))
    assert min(gains) > 0.3, gains


def test_stage_runs_videos_in_order_and_warns_without_weights() -> None:
    config = SsrStageConfig(upsampler=WaveletUpsamplerConfig(channels=8, num_blocks=1), weights="")
    stage = SsrStage(config)
    assert len(stage.warnings) == 1 and "RANDOM weights" in stage.warnings[0]
    with torch.no_grad():
        for level in stage.upsampler.levels:
            level.tail.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(8))
    data = np.random.default_rng(9).integers(0, 256, (2, 3, 3, 6, 8), dtype=np.uint8)  # (B, 3, T, H, W)
    request = Request("", "", 0, 6, 8, 3, 16.0)
    reported = []
    clip = stage(Clip(data, "pixel", 16.0, request), request, lambda done, total: reported.append((done, total)))
    assert clip.shape == (2, 3, 3, 12, 16) and clip.fps == 16.0 and reported[-1] == (3, 3)
    frames = to_model_range(torch.from_numpy(data).permute(2, 0, 1, 3, 4))  # (T, B, 3, H, W)
    with torch.no_grad():
        expected = torch.stack([to_uint8(o) for o in upsample_frames(stage.upsampler, frames)])
    np.testing.assert_array_equal(clip.numpy(), expected.permute(1, 2, 0, 3, 4).numpy())


# ---------------------------------------------------------------------------------------------------
# The standalone command


def test_standalone_command_end_to_end(tmp_path) -> None:
    frames = held_out_clip(32, seed=3)
    (tmp_path / "in.mp4").write_bytes(encode_mp4(frames, fps=12.0, quality=10))
    result = subprocess.run(
        [sys.executable, "-m", "stages.ssr", str(tmp_path / "in.mp4"), str(tmp_path / "out.mp4"), "--scale", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    upsampled, fps = read_video(str(tmp_path / "out.mp4"))
    assert upsampled.shape == (4, 64, 64, 3) and fps == pytest.approx(12.0)
    # the output is the input, upsampled: its area average is close to the (decoded) input
    decoded, _ = read_video(str(tmp_path / "in.mp4"))
    difference = np.abs(area_downsample(upsampled, 2).astype(float) - decoded).mean()
    assert difference < 6, difference
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []  # no temporary left


def test_standalone_command_bad_inputs(tmp_path, capsys) -> None:
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "small.mp4").write_bytes(encode_mp4(np.zeros((2, 6, 6, 3), dtype=np.uint8), fps=8.0))
    (tmp_path / "ok.mp4").write_bytes(encode_mp4(np.zeros((1, 8, 8, 3), dtype=np.uint8), fps=8.0))
    cases = [
        ([str(tmp_path / "missing.mp4"), "out.mp4"], "not found"),
        ([str(tmp_path / "text.mp4"), "out.mp4"], "cannot read"),
        ([str(tmp_path / "ok.mp4"), "out.mp4", "--scale", "3"], "--scale must be one of [2, 4], got 3"),
        ([str(tmp_path / "small.mp4"), "out.mp4"], "is 6x6: the upsampler needs at least 8x8"),
        ([str(tmp_path / "ok.mp4"), "out.mp4", "--weights", str(tmp_path / "none.safetensors")], "not found"),
    ]
    for argv, message in cases:
        assert ssr_command([*argv[:1], str(tmp_path / argv[1]), *argv[2:]]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error:") and message in error[0], (argv, error)
    assert not (tmp_path / "out.mp4").exists()
