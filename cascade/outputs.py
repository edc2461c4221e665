"""Everything the driver writes: one folder per prompt with the video, previews and a manifest.

    OUT/<run-id>/video.mp4
    OUT/<run-id>/previews/{base,tsr,ssr}.gif   written the moment each stage finishes
    OUT/<run-id>/previews/{base,tsr,ssr}.png   contact sheets
    OUT/<run-id>/manifest.json                 what was asked, what ran where, how long it took

Every file is written to a temporary name in its folder and renamed into place, so a reader never
sees a half-written file and a crash leaves none behind. The folder is created only when the first
stage has something to write.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from cascade.actors import EncodedVideo, StageReport
from cascade.errors import UserError
from cascade.payload import Request

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
    """Writes one prompt's folder as its stages finish."""

    def __init__(self, out_dir: Path, run_id: str, request: Request, manifest_base: dict):
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

    def _write(self, relative: str, data: bytes) -> None:
        write_atomic(self.folder / relative, data)
        self.manifest["files"].append(relative)

    def add_report(self, report: StageReport) -> None:
        self._write(f"previews/{report.stage}.gif", report.preview.gif)
        self._write(f"previews/{report.stage}.png", report.preview.contact_sheet_png)
        record = asdict(report)
        del record["preview"], record["stage"], record["prompt_index"]
        self.manifest["stages"][report.stage] = record

    def finish(self, video: EncodedVideo | None, error: BaseException | None = None, failed_stage: str | None = None) -> Path:
        """Writes the video (if any) and the manifest; returns the folder."""
        if video is not None:
            self._write("video.mp4", video.mp4)
            frames, height, width, _ = video.shape
            self.manifest["video"] = {"file": "video.mp4", "frames": frames, "height": height, "width": width, "fps": video.fps}
        self.manifest["status"] = "ok" if error is None else "failed"
        if error is not None:
            self.manifest["error"] = {"stage": failed_stage, "message": str(error).strip().splitlines()[-1][:2000]}
        self.manifest["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))
        self.manifest["wall_time_s"] = round(time.time() - self.started, 3)
        self.manifest["files"].append("manifest.json")
        write_atomic(self.folder / "manifest.json", (json.dumps(self.manifest, indent=2, ensure_ascii=False) + "\n").encode())
        return self.folder
