"""run_cascade.py end to end, as a user runs it: files, shapes, manifest, previews before the video,
prompts files, determinism, and every bad input ending in exit code 2 with one line and no files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import run_cascade
from cascade.config import load_config
from cascade.video import read_video
from stages.ssr.stage import SsrStage
from stages.weights import WeightsError
from tests.conftest import FAST, REFERENCE, REFERENCE_PROMPTS, REFERENCE_SEED, outputs_by_prompt, run_cli

PROMPT = "一个红色的球向右滚动"


def run_folders(out: Path) -> list[Path]:
    return sorted(path for path in out.iterdir() if path.is_dir()) if out.exists() else []


def check_run_folder(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    for stage in ("base", "tsr", "ssr"):
        assert (folder / "previews" / f"{stage}.gif").read_bytes().startswith(b"GIF8")
        assert (folder / "previews" / f"{stage}.png").read_bytes().startswith(b"\x89PNG")
    frames, fps = read_video(str(folder / "video.mp4"))
    config, stages = manifest["config"], manifest["stages"]
    factor, scale = config["stages"]["tsr"]["factor"], config["stages"]["ssr"]["upsampler"]["scale"]
    decoded = stages["tsr"]["notes"]["decoded_frames"]
    assert decoded == config["video"]["num_frames"]
    assert frames.shape == ((decoded - 1) * factor + 1, config["video"]["height"] * scale, config["video"]["width"] * scale, 3)
    assert fps == pytest.approx(config["video"]["fps"] * factor)
    assert manifest["video"]["frames"] == frames.shape[0]
    return manifest


def test_random_weights_are_named_in_the_manifest(tmp_path, ray_cluster):
    result = run_cli("--out", str(tmp_path), "--seed", "5", "--address", ray_cluster.address, *FAST,
                     "stages.tsr.vae_weights=''")
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = run_folders(tmp_path)
    warnings = json.loads((folder / "manifest.json").read_text())["warnings"]
    assert any("RANDOM" in warning and "stages.tsr.vae_weights" in warning for warning in warnings)


def test_default_tiny_cascade_end_to_end(tmp_path):
    """The user's first command: local Ray, the default tiny config, all files."""
    result = run_cli("--prompt", PROMPT, "--out", str(tmp_path), "--seed", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    [folder] = run_folders(tmp_path)
    manifest = check_run_folder(folder)
    assert (manifest["prompt"], manifest["seed"]) == (PROMPT, 5)
    assert "negative_prompt" in manifest and manifest["config"]["name"] == "tiny"
    assert manifest["stages"]["base"]["input_shape"] is None
    assert manifest["stages"]["tsr"]["input_shape"] == manifest["stages"]["base"]["output_shape"]
    for stage in ("base", "tsr", "ssr"):
        record = manifest["stages"][stage]
        assert record["wall_time_s"] > 0 and record["device"].startswith("cpu") and record["output_fps"] > 0
    assert {"torch", "ray", "python", "av"} <= set(manifest["software"])
    # every tiny model ships trained weights: nothing is random
    assert not [warning for warning in manifest["warnings"] if "RANDOM" in warning], manifest["warnings"]
    # each preview is written when its stage finishes: the base preview exists before ssr is done
    base_preview = (folder / "previews" / "base.gif").stat().st_mtime
    assert base_preview < manifest["stages"]["ssr"]["finished_at"]
    assert base_preview <= (folder / "video.mp4").stat().st_mtime
    assert "dashboard" in result.stderr.lower()


def test_prompts_file_writes_every_prompt(ray_cluster, tmp_path):
    """Every line a video, seeds counting up; a prompt longer than the text encoder takes is truncated
    and its manifest says so."""
    long_prompt = ("a green triangle moving left " * 20).strip()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a red circle moving right\n\n一个蓝色的方块向上移动\n{long_prompt}\n")
    out = tmp_path / "out"
    result = run_cli("--prompts-file", str(prompts), "--out", str(out), "--seed", "7",
                     "--address", ray_cluster.address, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = run_folders(out)
    manifests = [check_run_folder(folder) for folder in folders]
    assert sorted(m["prompt"] for m in manifests) == sorted(["a red circle moving right", "一个蓝色的方块向上移动", long_prompt])
    assert sorted(m["seed"] for m in manifests) == [7, 8, 9]
    truncated = {m["prompt"]: m["stages"]["base"]["notes"].get("prompt_truncated", "") for m in manifests}
    assert "truncated" in truncated.pop(long_prompt) and not any(truncated.values())


def test_same_prompt_and_seed_make_the_same_video(reference_run, ray_cluster, tmp_path):
    """A prompt of the reference run's prompts file, run alone with the seed it had there (its own
    --seed, as prompt 0), makes the same video: nothing but the prompt and the seed decides it."""
    index = 1
    prompt = REFERENCE_PROMPTS[index]
    result = run_cli("--prompt", prompt, "--out", str(tmp_path), "--seed", str(REFERENCE_SEED + index),
                     "--address", ray_cluster.address, *REFERENCE)
    assert result.returncode == 0, result.stderr[-3000:]
    [(video, manifest)] = outputs_by_prompt(tmp_path).values()
    reference_video, reference_manifest = reference_run.outputs[index]
    assert manifest["prompt"] == reference_manifest["prompt"] == prompt and manifest["prompt_index"] == 0
    assert video == reference_video


def bad_weights(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 definitely not safetensors" * 10)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({"levels.0.head.weight": torch.zeros(2, 2), "something.else": torch.zeros(3)}, str(mismatched))
    folder = tmp_path / "a_folder.pth"
    folder.mkdir()
    return {"missing": tmp_path / "absent.safetensors", "corrupt": corrupt, "mismatched": mismatched, "unreadable": folder}


@pytest.mark.parametrize(
    "case, args, message",
    [
        ("empty prompt", ["--prompt", "  "], "prompt is empty"),
        ("height", ["video.height=100"], "video.height"),
        ("frames", ["video.num_frames=16"], "video.num_frames"),
        ("factor", ["stages.tsr.factor=12"], "stages.tsr.factor"),
        ("scale", ["stages.ssr.upsampler.scale=8"], "stages.ssr.upsampler.scale"),
        ("config file", ["--config", "configs/nope.yaml"], "config file not found"),
        ("wan without checkpoint", ["--config", "configs/wan2.1-t2v-1.3b.yaml"], "checkpoint"),
        ("address", ["--address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
        ("prompts file", ["--prompts-file", "no/such/file.txt"], "cannot read prompts file"),
    ],
)
def test_bad_input_before_ray(tmp_path, capsys, case, args, message):
    """Checked before Ray starts, so run in-process (the same main() the script calls)."""
    out = tmp_path / "out"
    assert run_cascade.main(["--out", str(out), *args]) == 2, case
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], stderr
    assert run_folders(out) == []


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert run_cascade.main(["--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"), ("corrupt", "cannot read weights"), ("mismatched", "missing keys"), ("unreadable", "is a folder"),
])
def test_bad_weights_are_named_by_the_stage(tmp_path, case, message):
    """The stage, set up as its actor sets it up, names the file and what is wrong with it."""
    weights = bad_weights(tmp_path)[case]
    with pytest.raises(WeightsError) as error:
        SsrStage(load_config(None, [f"stages.ssr.weights={weights}"]).stages.ssr)
    first_line = str(error.value).strip().splitlines()[0]
    assert message in first_line and weights.name in first_line
    if case == "mismatched":
        assert "levels.0" in first_line and "something.else" in first_line


def test_bad_weights_fail_before_any_output(ray_cluster, tmp_path):
    """Raised in the stage's actor, the error above ends the run with exit 2, its first line, and no
    run folder (one case: the others travel the same way)."""
    weights = bad_weights(tmp_path)["mismatched"]
    out = tmp_path / "out"
    result = run_cli("--out", str(out), "--address", ray_cluster.address, f"stages.ssr.weights={weights}", *FAST)
    assert result.returncode == 2, result.stderr[-3000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "missing keys" in error_lines[0], result.stderr[-3000:]
    assert str(weights.name) in error_lines[0] and "levels.0" in error_lines[0] and "something.else" in error_lines[0]
    assert run_folders(out) == []
