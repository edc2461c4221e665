"""The learned frame interpolator: shapes, time conditioning, the shipped weights, training and its
resumption, the stage's choice of interpolator, and the standalone `python -m stages.tsr` command."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cascade.video import encode_mp4, read_video
from stages.pixels import to_model_range
from stages.training import TrainingConfig, train
from stages.training_data import clip_batch
from stages.tsr import LearnedInterpolator, LearnedInterpolatorConfig, interpolate_frames
from stages.tsr.__main__ import main as tsr_main
from stages.tsr.__main__ import pad_to_even
from stages.tsr.learned import bilateral_costs
from stages.tsr.stage import SHIPPED_WEIGHTS, TsrStageConfig, make_interpolator
from stages.tsr.training import TsrTrainingConfig, interpolation_loss, main as training_main, training_batches

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / SHIPPED_WEIGHTS
TINY = LearnedInterpolatorConfig(
    strides=[8, 4], widths=[8, 8], search_radii=[1, 1], block_depth=1, refine_width=4, refine_depth=1
)
TINY_OVERRIDES = [
    "interpolator.strides=[8,4]", "interpolator.widths=[8,8]", "interpolator.search_radii=[1,1]",
    "interpolator.block_depth=1",
    "interpolator.refine_width=4", "interpolator.refine_depth=1", "crop_size=32", "training.batch_size=2",
    "training.warmup_steps=1", "training.log_every=1",
]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scrambled(model: LearnedInterpolator, seed: int = 0) -> LearnedInterpolator:
    """Every parameter random, the zero-initialised output layers included, so that an untrained
    model predicts flows, masks and residuals that are far from zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model


def held_out_triplets(count: int, size: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    clips = clip_batch(step=0, seed=seed, batch_size=count, num_frames=3, size=size, split="held_out")
    frames = to_model_range(torch.from_numpy(clips)).permute(1, 0, 4, 2, 3)  # (3, B, 3, S, S)
    return frames[0], frames[2], frames[1]


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak-to-peak 2 for frames in [-1, 1]."""
    return 10 * math.log10(4 / (image.clamp(-1, 1) - reference).square().mean().item())


# ---------------------------------------------------------------------------------------------------
# The model


def test_frames_of_any_size_come_back_in_that_size():
    torch.manual_seed(0)
    model = scrambled(LearnedInterpolator())
    frame0, frame1 = torch.rand(2, 3, 37, 45) * 2 - 1, torch.rand(2, 3, 37, 45) * 2 - 1
    with torch.no_grad():
        output = model(frame0, frame1, [0.25, 0.5])
    assert output.shape == (2, 2, 3, 37, 45) and torch.isfinite(output).all()
    # Each pair is interpolated on its own: the second item does not change the first's result.
    with torch.no_grad():
        alone = model(frame0[:1], frame1[:1], [0.25, 0.5])
    torch.testing.assert_close(alone[:, 0], output[:, 0], atol=1e-5, rtol=0)
    assert sum(p.numel() for p in LearnedInterpolator().parameters()) < 2_000_000


@pytest.mark.parametrize("weights", ["random", "shipped"])
def test_the_ends_of_the_interval_return_the_inputs(weights):
    model = scrambled(LearnedInterpolator()) if weights == "random" else LearnedInterpolator.from_pretrained(str(SHIPPED))
    frame0, frame1, _ = held_out_triplets(2, 48)
    with torch.no_grad():
        ends = model(frame0, frame1, [0.0, 1.0, 0.5])
    torch.testing.assert_close(ends[0], frame0, atol=1e-4, rtol=0)
    torch.testing.assert_close(ends[1], frame1, atol=1e-4, rtol=0)
    # In between the model does something: neither input, nor their average.
    for other in (frame0, frame1, 0.5 * (frame0 + frame1)):
        assert (ends[2] - other).abs().mean() > 1e-3


def test_the_shipped_model_beats_blending_on_held_out_clips():
    frame0, frame1, truth = held_out_triplets(4, 96)
    model = LearnedInterpolator.from_pretrained(str(SHIPPED))
    with torch.no_grad():
        middle = model(frame0, frame1, [0.5])[0]
    learned = psnr(middle, truth)
    blended = psnr(0.5 * (frame0 + frame1), truth)
    assert learned > blended + 3.0, (learned, blended)


def test_the_cost_volume_is_lowest_at_the_true_motion():
    """Frame 1 is frame 0 rolled by (4, −2) px; at t = 1/2 the offset (4, −2) warps both frames onto
    the same whole-pixel shift, so its cost is zero away from the wrap-around border, and the soft
    minimum lands on it."""
    generator = torch.Generator().manual_seed(3)
    frame0 = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    frame1 = torch.roll(frame0, shifts=(-2, 4), dims=(2, 3))  # content moves 4 right, 2 up
    costs, offset = bilateral_costs(frame0, frame1, torch.zeros(1, 4, 32, 32), torch.tensor(0.5).view(1, 1, 1, 1), 4)
    assert costs.shape == (1, 81, 32, 32) and offset.shape == (1, 2, 32, 32)
    true_index = (-2 + 4) * 9 + (4 + 4)  # offsets run over x fastest, then y, each from −4 to 4
    interior = (slice(None), slice(8, -8), slice(8, -8))
    assert costs[0, true_index][interior[1:]].abs().max() < 1e-5
    assert (costs[0].argmin(dim=0)[interior[1:]] == true_index).all()
    torch.testing.assert_close(offset[0, 0][interior[1:]], torch.full((16, 16), 4.0), atol=1e-3, rtol=0)
    torch.testing.assert_close(offset[0, 1][interior[1:]], torch.full((16, 16), -2.0), atol=1e-3, rtol=0)


def test_config_is_a_structured_config_and_rejects_bad_values():
    merged = OmegaConf.merge(OmegaConf.structured(LearnedInterpolatorConfig), {"widths": [32, 16, 8]})
    config = OmegaConf.to_object(merged)
    assert isinstance(config, LearnedInterpolatorConfig) and config.widths == [32, 16, 8]
    with pytest.raises(ValueError, match=r"power of two.*\[12, 4\]"):
        LearnedInterpolatorConfig(strides=[12, 4], widths=[8, 8], search_radii=[1, 1])
    with pytest.raises(ValueError, match=r"decrease.*\[4, 8\]"):
        LearnedInterpolatorConfig(strides=[4, 8], widths=[8, 8], search_radii=[1, 1])
    with pytest.raises(ValueError, match=r"one entry per flow block.*widths=\[8\]"):
        LearnedInterpolatorConfig(strides=[8, 4], widths=[8], search_radii=[1, 1])
    with pytest.raises(ValueError, match=r"search radius.*\[-1, 1\]"):
        LearnedInterpolatorConfig(strides=[8, 4], widths=[8, 8], search_radii=[-1, 1])
    with pytest.raises(ValueError, match="1.5"):
        LearnedInterpolator(TINY)(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), [1.5])


# ---------------------------------------------------------------------------------------------------
# Training


def test_the_loss_rewards_the_true_flow():
    """With a pure horizontal pan the flows F_t0 = −t·u and F_t1 = (1 − t)·u for the true motion u
    warp both inputs onto the truth; the warping part of the loss must be far lower there."""
    size, shift = 48, 4.0
    xs = torch.arange(size, dtype=torch.float64)
    ys = xs.view(-1, 1)

    def frame(offset: float) -> torch.Tensor:  # a smooth pattern moving right by `offset` px
        x = xs - offset
        pattern = torch.sin(x / 3.1) * torch.cos(ys / 4.3) + 0.5 * torch.sin((x + ys) / 5.7)
        return (0.6 * pattern).float().expand(1, 3, size, size).clone()

    class FixedFlows(torch.nn.Module):
        def __init__(self, motion: float):
            super().__init__()
            self.motion = motion

        def interpolate(self, frame0, frame1, times):
            from stages.tsr.learned import Interpolation

            t = times.view(-1, 1, 1, 1)
            flow = torch.zeros(frame0.shape[0], 2, size, size)
            flow[:, 0] = -self.motion  # the content moves right: look left
            flow_t0, flow_t1 = t * flow, -(1 - t) * flow
            return Interpolation(0.5 * (frame0 + frame1), [flow_t0], [flow_t1])

    from stages.tsr.training import Triplets

    batch = Triplets(frame(0), frame(2 * shift), frame(shift), torch.tensor([0.5]))
    _, right = interpolation_loss(FixedFlows(2 * shift), batch, warp_weight=1.0)
    _, wrong = interpolation_loss(FixedFlows(0.0), batch, warp_weight=1.0)
    assert right["warping"] < 0.2 * wrong["warping"], (right, wrong)


def test_triplets_pick_the_frame_at_their_time():
    config = TsrTrainingConfig(crop_size=32, training=TrainingConfig(batch_size=6))
    batch = training_batches(config, None)(3)
    clips = clip_batch(3, 0, 6, 7, 32, max_motion=config.max_motion)
    frames = to_model_range(torch.from_numpy(clips)).permute(0, 1, 4, 2, 3)
    for index in range(6):
        position = round(batch.times[index].item() * 6)
        assert 1 <= position <= 5
        forwards = torch.equal(batch.frame0[index], frames[index, 0])
        first, last = (0, 6) if forwards else (6, 0)
        truth_index = position if forwards else 6 - position
        assert torch.equal(batch.frame0[index], frames[index, first])
        assert torch.equal(batch.frame1[index], frames[index, last])
        assert torch.equal(batch.truth[index], frames[index, truth_index])


def test_training_resumes_to_the_state_of_an_uninterrupted_run(tmp_path):
    config = TsrTrainingConfig(
        interpolator=TINY, crop_size=32,
        training=TrainingConfig(steps=4, batch_size=2, checkpoint_every=2, warmup_steps=1, log_every=1),
    )
    batches = training_batches(config, None)

    def loss(model, batch):
        return interpolation_loss(model, batch, config.warp_weight)

    def fresh() -> LearnedInterpolator:
        torch.manual_seed(5)
        return LearnedInterpolator(TINY)

    straight = fresh()
    train(straight, loss, batches, config.training, tmp_path / "straight", "w.safetensors")

    def interrupted(step: int):
        if step == 3:  # dies after the checkpoint of step 2
            raise KeyboardInterrupt
        return batches(step)

    with pytest.raises(KeyboardInterrupt):
        train(fresh(), loss, interrupted, config.training, tmp_path / "resumed", "w.safetensors")
    resumed = fresh()
    train(resumed, loss, batches, config.training, tmp_path / "resumed", "w.safetensors")

    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    straight_state = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)["optimizer"]
    resumed_state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["optimizer"]
    assert straight_state["state"].keys() == resumed_state["state"].keys()
    for index, moments in straight_state["state"].items():
        for name, value in moments.items():
            assert torch.equal(resumed_state["state"][index][name], value), (index, name)
    assert straight_state["param_groups"][0]["lr"] == resumed_state["param_groups"][0]["lr"]
    # The weights the run wrote are the trained model and load into a fresh one.
    loaded = LearnedInterpolator.from_pretrained(str(tmp_path / "resumed" / "w.safetensors"), TINY)
    for key, value in straight.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_the_training_command_writes_weights_a_log_and_a_record(tmp_path, capsys):
    out = tmp_path / "run"
    assert training_main(["--out", str(out), "--steps", "2", *TINY_OVERRIDES]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2]
    assert {"loss", "reconstruction", "warping"} <= records[0].keys()
    record = json.loads((out / "training_record.json").read_text())
    assert record["config"]["interpolator"]["widths"] == [8, 8] and record["config"]["training"]["steps"] == 2
    LearnedInterpolator.from_pretrained(str(out / "interpolator.safetensors"), TINY)

    assert training_main(["--out", str(out), "interpolator.depth=3"]) == 2
    assert "depth" in capsys.readouterr().out
    assert training_main(["--out", str(out), "--videos", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert training_main(["--out", str(out), "--videos", str(tmp_path / "empty")]) == 2
    assert "no videos" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# The stage's interpolator


def test_the_stage_picks_its_interpolator():
    warnings: list[str] = []
    learned = make_interpolator(TsrStageConfig(), warnings)
    assert isinstance(learned, LearnedInterpolator) and not warnings  # the shipped weights by default
    random = make_interpolator(TsrStageConfig(interpolator_weights=""), warnings)
    assert isinstance(random, LearnedInterpolator) and "RANDOM" in warnings[0]
    frames = torch.rand(3, 3, 16, 24) * 2 - 1
    classical = make_interpolator(TsrStageConfig(interpolator="classical"), warnings)
    assert interpolate_frames(frames, 2, classical).shape == (5, 3, 16, 24)
    with pytest.raises(ValueError, match="learned.*classical.*'optical'"):
        make_interpolator(TsrStageConfig(interpolator="optical"), warnings)


# ---------------------------------------------------------------------------------------------------
# python -m stages.tsr


def moving_frames(count: int, height: int, width: int, speed: float = 3.0) -> np.ndarray:
    """A smooth colour pattern moving `speed` px right per frame, uint8 (T, H, W, 3)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = []
    for index in range(count):
        x = xs - speed * index
        frames.append(np.stack([
            128 + 90 * np.sin(x / 5.0) * np.cos(ys / 7.0),
            128 + 90 * np.sin((x + ys) / 9.0),
            128 + 60 * np.cos(x / 4.0 - ys / 11.0),
        ], axis=-1))
    return np.round(np.stack(frames)).astype(np.uint8)


def test_the_command_raises_the_frame_rate_of_a_video(tmp_path):
    source = tmp_path / "in.mp4"
    source.write_bytes(encode_mp4(moving_frames(4, 48, 64, speed=6.0), fps=8, quality=10))
    target = tmp_path / "out" / "slow.mp4"
    completed = subprocess.run(
        [sys.executable, "-m", "stages.tsr", str(source), str(target), "--factor", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr
    decoded_in, _ = read_video(str(source))
    decoded_out, fps = read_video(str(target))
    assert decoded_out.shape == (10, 48, 64, 3) and fps == pytest.approx(24)
    truth = moving_frames(10, 48, 64, speed=2.0).astype(float)  # the pattern at every output time

    def error(frame: np.ndarray, index: int) -> float:  # away from the border the motion uncovers
        return np.abs(frame.astype(float) - truth[index])[:, 14:].mean()

    # The input frames are kept, up to a second H.264 encode; H.264's chroma subsampling of this
    # saturated pattern alone costs about 4 levels, so that is the floor for every frame.
    kept = [error(decoded_out[3 * index], 3 * index) for index in range(4)]
    for index in range(4):
        assert np.abs(decoded_out[3 * index].astype(float) - decoded_in[index]).mean() < 3
    # The new frames show the pattern moved by their share of the step: as close to the truth as
    # the kept frames are, and far closer than the nearest input frame would be.
    for index in (1, 2, 4, 5, 7, 8):
        nearest = decoded_out[3 * round(index / 3)]
        assert error(decoded_out[index], index) < max(kept) + 1.0, index
        assert error(decoded_out[index], index) < 0.5 * error(nearest, index), index
    assert list(tmp_path.glob("out/.*")) == []  # no temporary file left behind


def write_video(path: Path, frames: np.ndarray, codec: str = "ffv1") -> None:
    """Any size, lossless, through PyAV (encode_mp4 takes even sizes only)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_the_command_names_bad_inputs(tmp_path, capsys):
    good = tmp_path / "good.mkv"
    write_video(good, moving_frames(3, 32, 32))
    (tmp_path / "notes.mp4").write_text("not a video")
    write_video(tmp_path / "single.mkv", moving_frames(1, 32, 32))
    write_video(tmp_path / "tiny.mkv", moving_frames(3, 12, 20))
    cases = [
        ([str(tmp_path / "missing.mp4")], "not found.*missing.mp4"),
        ([str(tmp_path / "notes.mp4")], "notes.mp4"),
        ([str(good), "--factor", "9"], "factor.*1 to 8.*9"),
        ([str(good), "--factor", "0"], "factor.*1 to 8.*0"),
        ([str(tmp_path / "single.mkv")], "1 frame.*at least 2"),
        ([str(tmp_path / "tiny.mkv")], "20x12.*at least 16x16"),
        ([str(good), "--weights", str(tmp_path / "none.safetensors")], "not found.*none.safetensors"),
    ]
    for arguments, message in cases:
        code = tsr_main([arguments[0], str(tmp_path / "out.mp4"), *arguments[1:]])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2, arguments
        assert error.startswith("error: ") and re.search(message, error), (arguments, error)
    assert not (tmp_path / "out.mp4").exists()


def test_odd_sized_videos_are_padded_for_h264(tmp_path, capsys):
    frames = moving_frames(2, 33, 41)
    padded = pad_to_even(frames)
    assert padded.shape == (2, 34, 42, 3)
    assert np.array_equal(padded[:, :33, :41], frames) and np.array_equal(padded[:, 33, :41], frames[:, 32])
    write_video(tmp_path / "odd.mkv", frames)
    assert tsr_main([str(tmp_path / "odd.mkv"), str(tmp_path / "out.mp4"), "--factor", "2", "--method", "classical"]) == 0
    assert "odd" in capsys.readouterr().err
    assert read_video(str(tmp_path / "out.mp4"))[0].shape == (3, 34, 42, 3)
