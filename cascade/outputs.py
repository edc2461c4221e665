"""Everything the driver writes: one folder per prompt with the video, previews and a manifest.

    OUT/<run-id>/video.mp4
    OUT/<run-id>/previews/{base,tsr,ssr}.gif   written the moment each stage finishes
    OUT/<run-id>/previews/{base,tsr,ssr}.png   contact sheets
    OUT/<run-id>/manifest.json                 what was asked, what ran where, how long it took;
                                               rewritten as each stage finishes and when it ends
    OUT/<run-id>/resume/{base,tsr}.safetensors finished stages' outputs, kept for --resume until
                                               the video is written (tsr's only if asked: large)
    OUT/run.json                               the run's prompts, seed, config and folders: what
                                               --resume checks and continues
    OUT/<run-id>/report.html                   the live run page (cascade/report.py), rewritten as
                                               each stage finishes and when the prompt ends
    OUT/index.html                             every prompt of a prompts-file run on one live page

Every file is written to a temporary name in its folder and renamed into place, so a reader never
sees a half-written file and a crash leaves none behind. The folder is created only when the first
stage has something to write.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from cascade.actors import EncodedVideo, StageReport
from cascade.errors import UserError
from cascade.payload import Clip, Request, clip_from_safetensors, clip_to_safetensors
from cascade.report import render_index_page, render_run_page

SOFTWARE = ("torch", "ray", "transformers", "numpy", "av", "omegaconf", "PyWavelets", "safetensors")


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    write_atomic(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode())


def check_writable(out_dir: Path) -> None:
    """Raises `UserError` if files cannot be created in `out_dir` (created if absent)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-check-"):
            pass
    except OSError as error:
        raise UserError(f"output folder {out_dir} is not writable: {error.strerror or error}") from None


def software_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class RunWriter:
    """Writes one prompt's folder as its stages finish. With `resume`, `run_id` is a folder an earlier
    run left unfinished, reopened: its finished stages' records stay in the manifest."""

    def __init__(self, out_dir: Path, run_id: str, request: Request, manifest_base: dict, resume: bool = False):
        if not resume:
            taken = 1
            while (out_dir / run_id).exists():  # the same seed twice in one second
                taken += 1
                run_id = f"{run_id.rsplit('~', 1)[0]}~{taken}"
        self.folder = out_dir / run_id
        self.request = request
        self.started = time.time()
        self.manifest = {
            "run_id": run_id,
            "status": "running",
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": request.seed,
            "prompt_index": request.index,
            "request": asdict(request),
            **manifest_base,
            "stages": {},
            "files": [],
        }
        earlier = self.folder / "manifest.json"
        if resume and earlier.is_file():
            previous = json.loads(earlier.read_text(encoding="utf-8"))
            if previous.get("status") == "ok" and (self.folder / "video.mp4").is_file():
                self.manifest = previous  # written: left as it is
            else:
                self.manifest["stages"] = previous.get("stages", {})
                self.manifest["files"] = [name for name in previous.get("files", []) if (self.folder / name).is_file()]

    @property
    def written(self) -> bool:
        """Whether this prompt's video is written (by this run or, resumed, an earlier one)."""
        return self.manifest["status"] == "ok"

    @property
    def finished_stages(self) -> list[str]:
        return list(self.manifest["stages"])

    def _add_file(self, relative: str) -> None:
        if relative not in self.manifest["files"]:
            self.manifest["files"].append(relative)

    def _write(self, relative: str, data: bytes) -> None:
        write_atomic(self.folder / relative, data)
        self._add_file(relative)

    def _write_manifest_and_page(self) -> None:
        self._add_file("report.html")
        self._add_file("manifest.json")
        write_atomic(self.folder / "report.html", render_run_page(self.manifest).encode())
        write_json(self.folder / "manifest.json", self.manifest)

    def add_report(self, report: StageReport) -> None:
        self._write(f"previews/{report.stage}.gif", report.preview.gif)
        self._write(f"previews/{report.stage}.png", report.preview.contact_sheet_png)
        record = asdict(report)
        del record["preview"], record["stage"], record["prompt_index"]
        self.manifest["stages"][report.stage] = record
        self._write_manifest_and_page()

    def keep_stage_output(self, stage: str, clip: Clip) -> None:
        """Keeps a finished stage's output for --resume (resume/<stage>.safetensors)."""
        self._write(f"resume/{stage}.safetensors", clip_to_safetensors(clip))

    def last_kept_output(self, stages: tuple[str, ...]) -> tuple[str, Clip] | None:
        """The latest of `stages` (in order) whose output an earlier run kept, and that output."""
        for stage in reversed(stages):
            path = self.folder / "resume" / f"{stage}.safetensors"
            if path.is_file():
                return stage, clip_from_safetensors(path.read_bytes(), self.request)
        return None

    def resume(self, stages: tuple[str, ...], kept: str | None) -> str:
        """Starts this prompt again after the stage `kept` (None: from the first of `stages`): the
        records of the stages after it go, the manifest says where it resumed. Returns the stage it
        resumes at."""
        start = stages.index(kept) + 1 if kept else 0
        self.manifest["stages"] = {stage: entry for stage, entry in self.manifest["stages"].items()
                                   if stage in stages[:start]}
        self.manifest["resumed"] = {"from_stage": stages[start], "kept_output_of": kept,
                                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return stages[start]

    def _end(self, status: str) -> Path:
        self.manifest["status"] = status
        stages = self.finished_stages
        self.manifest["last_finished_stage"] = stages[-1] if stages else None
        self.manifest["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))
        self.manifest["wall_time_s"] = round(time.time() - self.started, 3)
        self._write_manifest_and_page()
        return self.folder

    def finish(self, video: EncodedVideo | None, error: BaseException | None = None, failed_stage: str | None = None) -> Path:
        """Writes the video (if any) and the manifest; returns the folder. Once the video is written
        the stage outputs kept for --resume are deleted."""
        if video is not None:
            self._write("video.mp4", video.mp4)
            frames, height, width, _ = video.shape
            self.manifest["video"] = {"file": "video.mp4", "frames": frames, "height": height, "width": width, "fps": video.fps}
        if error is None:
            shutil.rmtree(self.folder / "resume", ignore_errors=True)
            self.manifest["files"] = [name for name in self.manifest["files"] if not name.startswith("resume/")]
        else:
            self.manifest["error"] = {"stage": failed_stage, "message": str(error).strip().splitlines()[-1][:2000]}
        return self._end("ok" if error is None else "failed")

    def interrupt(self) -> Path | None:
        """Records that the run stopped before this prompt ended (if it had begun); returns the folder."""
        return self._end("interrupted") if self.folder.exists() else None


class IndexWriter:
    """Writes OUT/index.html, the live page of every prompt of a prompts-file run, from their writers."""

    def __init__(self, out_dir: Path, writers: list[RunWriter]):
        self.path = out_dir / "index.html"
        self.writers = writers

    def update(self) -> None:
        runs = [(writer.folder.name, writer.manifest) for writer in self.writers]
        write_atomic(self.path, render_index_page(runs).encode())


RUN_RECORD = "run.json"


def write_run_record(out_dir: Path, prompts: list[str], seed: int, config: dict, folders: dict[int, str]) -> None:
    """What `--resume` needs to continue this run in `out_dir`: its prompts, first seed, resolved
    config and each prompt's folder."""
    record = {"prompts": prompts, "seed": seed, "config": config, "folders": {str(index): name for index, name in folders.items()}}
    write_json(out_dir / RUN_RECORD, record)


def _first_difference(earlier, now, key: str = "") -> tuple[str, object, object] | None:
    """(dotted key, earlier value, value now) of the first value that differs between two plain
    configs, or None."""
    if isinstance(earlier, dict) and isinstance(now, dict):
        for name in sorted(set(earlier) | set(now)):
            found = _first_difference(earlier.get(name), now.get(name), f"{key}.{name}" if key else name)
            if found:
                return found
        return None
    return None if earlier == now else (key, earlier, now)


# Settings that say where and how fast the stages run, not what they make (beyond float rounding):
# --resume may change them.
PLACEMENT_KEYS = ("resources", "parallel", "replicas", "compile")
RUN_KEYS = ("retries", "patience_s", "transport")


def _what_decides_the_videos(config: dict) -> dict:
    kept = {key: value for key, value in config.items() if key not in RUN_KEYS}
    kept["output"] = {key: value for key, value in config.get("output", {}).items() if key != "max_prompts_in_flight"}
    kept["stages"] = {name: {key: value for key, value in section.items() if key not in PLACEMENT_KEYS}
                      for name, section in config.get("stages", {}).items()}
    return kept


def read_run_record(out_dir: Path, prompts: list[str], config: dict, seed: int | None) -> dict:
    """The record of the run `--resume` continues; raises `UserError` naming what differs when the
    prompts, the config or an explicit seed are not the earlier run's."""
    path = out_dir / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--resume: {out_dir} holds no earlier run ({RUN_RECORD} is missing): run without --resume") from None
    except (OSError, ValueError) as error:
        raise UserError(f"--resume: cannot read {path}: {error}") from None
    if record["prompts"] != prompts:
        changed = next((index for index, (a, b) in enumerate(zip(record["prompts"], prompts)) if a != b), None)
        where = (f"prompt {changed} was {record['prompts'][changed]!r}, now {prompts[changed]!r}" if changed is not None
                 else f"{len(record['prompts'])} prompts then, {len(prompts)} now")
        raise UserError(f"--resume: the prompts differ from the earlier run's in {out_dir} ({where}): "
                        f"give the same prompts, or a new --out")
    difference = _first_difference(_what_decides_the_videos(record["config"]), _what_decides_the_videos(config))
    if difference is not None:
        key, earlier, now = difference
        raise UserError(f"--resume: the config differs from the earlier run's in {out_dir}: {key} was {earlier!r}, "
                        f"now {now!r}: give the same config and overrides, or a new --out")
    if seed is not None and seed != record["seed"]:
        raise UserError(f"--resume: --seed {seed} differs from the earlier run's {record['seed']}: leave it out")
    return record
