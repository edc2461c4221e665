"""The live run page: report.html in each run folder and index.html for a prompts file. Rendered
from hand-made manifests (escaping, refreshing, rows, timeline geometry), kept current by the
writers, and loaded from a real run in headless Debian chromium."""

from __future__ import annotations

import json
import os
from contextlib import closing
from html.parser import HTMLParser

import pytest

from cascade.actors import StageReport
from cascade.outputs import IndexWriter, RunWriter
from cascade.payload import Request
from cascade.previews import Preview
from cascade.report import render_index_page, render_run_page
from tests.browser import CHROMIUM_PACKAGE, Chromium, find_chromium
from tests.conftest import FAST, run_cli

STAGES = ("base", "tsr", "ssr")


class Elements(HTMLParser):
    """A page's start tags with their attributes, and its text."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text = ""
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text += data

    def find(self, tag: str, **attrs: str) -> list[dict]:
        """Tags named `tag` with these attribute values (`http_equiv` stands for `http-equiv`)."""
        wanted = {key.replace("_", "-"): value for key, value in attrs.items()}
        return [found for name, found in self.tags if name == tag and wanted.items() <= found.items()]

    def refreshes(self) -> bool:
        return bool(self.find("meta", http_equiv="refresh"))


def stage_record(started_at: float, finished_at: float, replica: int = 0) -> dict:
    return {
        "replica": replica, "input_shape": [1, 16, 3, 8, 8], "input_transport": "object store",
        "output_shape": [1, 3, 9, 64, 64], "input_fps": 16.0, "output_fps": 48.0,
        "wall_time_s": finished_at - started_at, "started_at": started_at, "finished_at": finished_at,
        "device": "cpu (1 threads)", "node": "host (node-id)", "ranks": [], "notes": {},
    }


def manifest(index: int, status: str, stages: dict, prompt: str = "a red circle moving right", **extra) -> dict:
    """A manifest as RunWriter keeps it: report.html is listed once a stage has finished or the prompt ended."""
    files = [f"previews/{stage}.gif" for stage in stages] + (["report.html"] if stages or status != "running" else [])
    ended = {} if status == "running" else {"wall_time_s": 3.5}
    return {"run_id": f"run-p{index:03d}", "status": status, "prompt": prompt, "seed": 7 + index, "prompt_index": index,
            "warnings": [], "stages": stages, "files": files, **ended, **extra}


def sequential_stages(start: float, durations: tuple[float, ...]) -> dict:
    """Records of stages that ran one after another from `start` for these many seconds each."""
    records, clock = {}, start
    for stage, duration in zip(STAGES, durations):
        records[stage] = stage_record(clock, clock + duration)
        clock += duration
    return records


def test_user_text_is_escaped():
    prompt = '<script>alert("x")</script> 一个红色的球 & <em>"quoted"</em>'
    warning, message = "base: <em>RANDOM</em> weights", "shapes <1, 2> & <3> differ"
    page = manifest(0, "failed", {}, prompt=prompt, warnings=[warning], error={"stage": "base", "message": message})
    for html in (render_run_page(page), render_index_page([("run-p000", page)])):
        elements = Elements(html)
        assert not [tag for tag, _ in elements.tags if tag in ("script", "em")]
        assert prompt in elements.text and warning in elements.text and message in elements.text


def test_pages_refresh_only_while_a_prompt_runs():
    done = manifest(0, "ok", sequential_stages(100.0, (1, 1, 1)))
    failed = manifest(1, "failed", sequential_stages(100.0, (1,)), error={"stage": "tsr", "message": "out of memory"})
    running = manifest(2, "running", sequential_stages(100.0, (1,)))
    assert Elements(render_run_page(running)).refreshes()
    assert not Elements(render_run_page(done)).refreshes() and not Elements(render_run_page(failed)).refreshes()
    assert Elements(render_index_page([("a", done), ("b", running)])).refreshes()
    assert not Elements(render_index_page([("a", done), ("b", failed)])).refreshes()


def test_index_has_one_row_per_prompt_with_its_finished_previews():
    runs = [
        ("run-p000", manifest(0, "ok", sequential_stages(100.0, (2, 1, 1)))),
        ("run-p001", manifest(1, "failed", sequential_stages(101.0, (2,)), error={"stage": "tsr", "message": "boom"})),
        ("run-p002", manifest(2, "running", sequential_stages(102.0, (2,)))),
        ("run-p003", manifest(3, "running", {})),  # not admitted yet: no folder, no page to link
    ]
    elements = Elements(render_index_page(runs))
    assert len(elements.find("tr", **{"class": "prompt"})) == len(runs)
    assert [link["href"] for link in elements.find("a")] == [f"run-p00{index}/report.html" for index in range(3)]
    expected_images = [f"{folder}/previews/{stage}.gif" for folder, run in runs for stage in STAGES if stage in run["stages"]]
    assert [image["src"] for image in elements.find("img")] == expected_images
    assert "failed in tsr: boom" in elements.text


@pytest.mark.parametrize("page", ["index", "run"])
def test_timeline_bars_are_proportional_to_stage_times(page):
    # three prompts overlapping as a pipeline does: prompt k's base runs while prompt k-1's tsr and ssr do
    runs = [(f"run-p{index:03d}", manifest(index, "ok", sequential_stages(50.0 + 2.5 * index, (2.5, 0.7, 1.3))))
            for index in range(3)]
    if page == "index":
        html, lanes = render_index_page(runs), [run["stages"] for _, run in runs]
    else:
        html, lanes = render_run_page(runs[1][1]), [runs[1][1]["stages"]]
    bars = {(int(bar["data-lane"]), bar["data-stage"]): (float(bar["x"]), float(bar["width"]))
            for bar in Elements(html).find("rect", **{"class": "bar"})}
    calls = {(lane, stage): (record["started_at"], record["finished_at"]) for lane, stages in enumerate(lanes) for stage, record in stages.items()}
    assert bars.keys() == calls.keys()
    # the axis maps time linearly: the earliest start to the left end of the plot, the latest end to its right end
    origin = min(start for start, _ in calls.values())
    span = max(end for _, end in calls.values()) - origin
    left = min(x for x, _ in bars.values())
    plot_width = max(x + width for x, width in bars.values()) - left
    for key, (start, end) in calls.items():
        x, width = bars[key]
        assert x == pytest.approx(left + (start - origin) / span * plot_width, abs=0.01)
        assert width == pytest.approx((end - start) / span * plot_width, abs=0.01)


def fake_report(stage: str, started_at: float) -> StageReport:
    return StageReport(
        stage=stage, replica=0, prompt_index=0, input_shape=None, input_transport=None, output_shape=(1, 16, 3, 8, 8),
        input_fps=None, output_fps=16.0, wall_time_s=1.0, started_at=started_at, finished_at=started_at + 1.0,
        device="cpu (1 threads)", node="host", preview=Preview(gif=b"GIF89a", contact_sheet_png=b"\x89PNG"),
    )


def test_writers_keep_the_pages_current(tmp_path):
    requests = [Request(prompt=f"prompt {index}", negative_prompt="", seed=index, height=64, width=64, num_frames=9, fps=16, index=index)
                for index in range(2)]
    writers = [RunWriter(tmp_path, f"run-p{request.index:03d}", request, {"warnings": []}) for request in requests]
    index = IndexWriter(tmp_path, writers)
    index.update()
    assert len(Elements((tmp_path / "index.html").read_text()).find("tr", **{"class": "prompt"})) == 2
    assert not writers[0].folder.exists()  # nothing to show yet

    writers[0].add_report(fake_report("base", 100.0))
    page = Elements((writers[0].folder / "report.html").read_text())
    assert page.refreshes() and [image["src"] for image in page.find("img")] == ["previews/base.gif"]

    writers[0].finish(None, RuntimeError("tsr ran out of memory"), "tsr")
    writers[1].finish(None, RuntimeError("base ran out of memory"), "base")
    index.update()
    for writer in writers:
        page = Elements((writer.folder / "report.html").read_text())
        assert not page.refreshes() and "ran out of memory" in page.text
        on_disk = json.loads((writer.folder / "manifest.json").read_text())
        assert on_disk["files"].count("report.html") == 1
    assert not Elements((tmp_path / "index.html").read_text()).refreshes()


@pytest.fixture
def browser():
    executable = find_chromium()
    if executable is None:
        message = f"no chromium to load the page in: install Debian's `{CHROMIUM_PACKAGE}` package"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with closing(Chromium(executable)) as chromium:
        yield chromium


IMAGES = "[...document.images].map(image => [image.getAttribute('src'), image.naturalWidth])"


def test_pages_of_a_real_run_load_in_chromium(browser, ray_cluster, tmp_path):
    prompts = ["a red circle moving right <b>now</b>", "一个蓝色的方块向上移动", "a green triangle moving left"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("--prompts-file", str(prompts_file), "--out", str(out), "--seed", "3", "--address", ray_cluster.address, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]

    browser.open((out / "index.html").as_uri())
    assert browser.console_errors == []
    images = browser.evaluate(IMAGES)
    assert len(images) == len(prompts) * len(STAGES) and all(width > 0 for _, width in images), images
    assert browser.evaluate("document.querySelectorAll('tr.prompt').length") == len(prompts)
    assert browser.evaluate("[...document.querySelectorAll('td.prompt-text a')].map(link => link.textContent)") == prompts
    assert browser.evaluate("document.querySelectorAll('svg.timeline rect.bar').length") == len(prompts) * len(STAGES)
    assert browser.evaluate("document.querySelector('meta[http-equiv=refresh]')") is None

    browser.open(browser.evaluate("document.querySelector('td.prompt-text a').href"))  # the first prompt's page
    assert browser.console_errors == []
    images = browser.evaluate(IMAGES)
    assert [src for src, _ in images] == [f"previews/{stage}.gif" for stage in STAGES] and all(width > 0 for _, width in images)
    assert browser.evaluate("document.querySelector('h1').textContent") == prompts[0]
    assert browser.evaluate("document.querySelector('video').getAttribute('src')") == "video.mp4"
