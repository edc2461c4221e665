"""The live run page: HTML views of run manifests that fill in as stages finish.

`render_run_page` draws one prompt's folder (its report.html): the three stage previews side by
side with their times, shapes and placement, the warnings, the error of a failed prompt, the video
once written, and a timeline of the prompt's stage calls. `render_index_page` draws every prompt of
a prompts-file run (index.html in --out): one row per prompt, and a timeline with one lane per
prompt, which shows the pipelining. While any prompt is still running the page reloads itself
every `REFRESH_SECONDS`. The pages are plain HTML with inline CSS and SVG: opened as files, they
need no server, no script and no network.
"""

from __future__ import annotations

import math
from html import escape
from urllib.parse import quote

from cascade.actors import STAGE_NAMES

REFRESH_SECONDS = 2
STAGE_COLOURS = dict(zip(STAGE_NAMES, ("#4e79a7", "#f28e2b", "#59a14f")))

# Timeline layout, in SVG pixels.
LANE_LABEL_WIDTH = 200
PLOT_WIDTH = 760
RIGHT_MARGIN = 30
AXIS_HEIGHT = 22
LANE_HEIGHT = 26
BAR_HEIGHT = 18
MIN_LABELLED_BAR = 34  # narrower bars carry their stage name only in their tooltip

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fafafa; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.muted { color: #666; } .small { font-size: 12px; }
.status { padding: 1px 8px; border-radius: 9px; color: #fff; font-size: 12px; }
.status.running { background: #4e79a7; } .status.ok { background: #2e7d32; } .status.failed { background: #c62828; } .status.interrupted { background: #8d6e63; }
.error { background: #fdecea; border-left: 4px solid #c62828; padding: 8px 12px; white-space: pre-wrap; }
.warnings { background: #fff8e1; border-left: 4px solid #f9a825; padding: 8px 12px 8px 28px; margin: 12px 0; }
.stages { display: flex; gap: 16px; flex-wrap: wrap; }
figure.stage { margin: 0; width: 256px; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
figure.stage img { display: block; width: 100%; image-rendering: pixelated; }
.placeholder { height: 128px; display: flex; align-items: center; justify-content: center;
  color: #888; background: repeating-linear-gradient(45deg, #f2f2f2, #f2f2f2 8px, #e8e8e8 8px, #e8e8e8 16px); }
figcaption { font-size: 12px; margin-top: 6px; overflow-wrap: anywhere; }
table { border-collapse: collapse; } td, th { padding: 6px 8px; vertical-align: top; border-bottom: 1px solid #ddd; }
th { text-align: left; }
table figure.stage { width: 180px; }
table .placeholder { height: 80px; }
td.prompt-text { max-width: 260px; }
video { width: 512px; max-width: 100%; background: #000; }
svg.timeline { max-width: 100%; height: auto; background: #fff; border: 1px solid #ddd; border-radius: 6px; }
svg.timeline text { font: 11px system-ui, sans-serif; fill: #333; }
svg.timeline text.bar-label { fill: #fff; }
svg.timeline line { stroke: #e3e3e3; }
.legend span { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; border-radius: 2px; }
"""


def render_run_page(manifest: dict) -> str:
    """One prompt's page, for report.html in its run folder."""
    prompt = manifest["prompt"]
    body = [
        f"<h1>{escape(prompt)}</h1>",
        f'<p class="muted">{_summary(manifest)} · run {escape(manifest["run_id"])}</p>',
        _error(manifest),
        _warnings(manifest["warnings"]),
        '<h2>Stages</h2><div class="stages">',
        *(_stage_figure(stage, manifest, folder="", detailed=True) for stage in STAGE_NAMES),
        "</div>",
    ]
    if "video" in manifest:
        video = manifest["video"]
        body.append(
            f'<h2>Video</h2><video src="{quote(video["file"])}" controls loop muted autoplay playsinline></video>'
            f'<p class="small muted">{video["frames"]} frames of {video["height"]}×{video["width"]} at {_number(video["fps"])} fps</p>'
        )
    body += ["<h2>Timeline</h2>", _timeline([(f"#{manifest['prompt_index']} {prompt}", manifest["stages"])])]
    if "manifest.json" in manifest["files"]:
        body.append('<p class="small"><a href="manifest.json">manifest.json</a></p>')
    return _page(prompt, running=manifest["status"] == "running", body=body)


def render_index_page(runs: list[tuple[str, dict]]) -> str:
    """Every prompt of a prompts-file run, for index.html in --out. `runs` pairs each run folder,
    relative to the page, with its manifest, in prompt order."""
    statuses = [manifest["status"] for _, manifest in runs]
    counts = ", ".join(f"{statuses.count(status)} {status}" for status in ("ok", "failed", "interrupted", "running")
                       if status in statuses)
    warnings = list(dict.fromkeys(warning for _, manifest in runs for warning in manifest["warnings"]))
    header = "".join(f"<th>{stage}</th>" for stage in STAGE_NAMES)
    body = [
        f"<h1>{len(runs)} prompts</h1>",
        f'<p class="muted">{counts}</p>',
        _warnings(warnings),
        "<h2>Timeline</h2>",
        _timeline([(f"#{manifest['prompt_index']} {manifest['prompt']}", manifest["stages"]) for _, manifest in runs]),
        f"<h2>Prompts</h2><table><thead><tr><th>#</th><th>prompt</th>{header}</tr></thead><tbody>",
        *(_index_row(folder, manifest) for folder, manifest in runs),
        "</tbody></table>",
    ]
    return _page(f"{len(runs)} prompts: {counts}", running="running" in statuses, body=body)


def _page(title: str, running: bool, body: list[str]) -> str:
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if running else ""
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8">{refresh}'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _summary(manifest: dict) -> str:
    """Status badge, seed and, once finished, the prompt's wall time."""
    status = manifest["status"]
    parts = [f'<span class="status {status}">{status}</span>', f"seed {manifest['seed']}"]
    if status == "running":
        parts.append(f"{len(manifest['stages'])} of {len(STAGE_NAMES)} stages done")
    else:
        parts.append(f"{manifest['wall_time_s']:.1f} s")
    return " · ".join(parts)


def _error(manifest: dict) -> str:
    if "error" not in manifest:
        return ""
    error = manifest["error"]
    return f'<div class="error">failed in {escape(str(error["stage"]))}: {escape(error["message"])}</div>'


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return '<ul class="warnings">' + "".join(f"<li>{escape(warning)}</li>" for warning in warnings) + "</ul>"


def _index_row(folder: str, manifest: dict) -> str:
    prompt = escape(manifest["prompt"])
    if "report.html" in manifest["files"]:
        prompt = f'<a href="{quote(folder)}/report.html">{prompt}</a>'
    cells = "".join(f"<td>{_stage_figure(stage, manifest, folder=f'{folder}/', detailed=False)}</td>" for stage in STAGE_NAMES)
    return (
        f'<tr class="prompt"><td>{manifest["prompt_index"]}</td>'
        f'<td class="prompt-text">{prompt}<br><span class="small">{_summary(manifest)}</span>{_error(manifest)}</td>{cells}</tr>'
    )


def _stage_figure(stage: str, manifest: dict, folder: str, detailed: bool) -> str:
    """A stage's preview with its time, shapes and placement; a placeholder until it has one.
    `folder` prefixes the preview's path; `detailed` adds the node, the input transport and the notes."""
    record = manifest["stages"].get(stage)
    if record is None:
        if manifest["status"] == "running":
            state = "waiting"
        else:
            state = "failed" if manifest.get("error", {}).get("stage") == stage else "not run"
        return f'<figure class="stage"><div class="placeholder">{state}</div><figcaption><b>{stage}</b></figcaption></figure>'
    lines = [
        f"<b>{stage}</b> {record['wall_time_s']:.2f} s",
        f"{_shape(record['input_shape'])} → {_shape(record['output_shape'])}",
        f"{_fps(record['input_fps'])} → {_fps(record['output_fps'])}",
        f"replica {record['replica']} · {escape(record['device'])}",
    ]
    if detailed:
        lines.append(f"node {escape(record['node'])}")
        if record["input_transport"] is not None:
            lines.append(f"input by {escape(record['input_transport'])}")
        lines += [f"{escape(str(key))}: {escape(str(value))}" for key, value in record["notes"].items()]
    preview = quote(f"{folder}previews/{stage}.gif")
    return (
        f'<figure class="stage"><img src="{preview}" alt="{stage} preview">'
        f'<figcaption>{"<br>".join(lines)}</figcaption></figure>'
    )


def _shape(shape: list | tuple | None) -> str:
    return "text" if shape is None else "×".join(str(size) for size in shape)


def _fps(fps: float | None) -> str:
    return "—" if fps is None else f"{_number(fps)} fps"


def _number(value: float) -> str:
    return f"{value:g}"


def _timeline(lanes: list[tuple[str, dict]]) -> str:
    """An SVG Gantt chart: one lane per (label, stage records) pair, one bar per finished stage call,
    coloured by stage, on a time axis from the earliest call's start to the latest call's end."""
    calls = [(lane, stage, record) for lane, (_, stages) in enumerate(lanes) for stage, record in stages.items()]
    if not calls:
        return '<p class="muted">No stage has finished yet.</p>'
    start = min(record["started_at"] for _, _, record in calls)
    span = max(max(record["finished_at"] for _, _, record in calls) - start, 1e-6)

    def x(seconds_from_start: float) -> float:
        return LANE_LABEL_WIDTH + seconds_from_start / span * PLOT_WIDTH

    width, height = LANE_LABEL_WIDTH + PLOT_WIDTH + RIGHT_MARGIN, AXIS_HEIGHT + len(lanes) * LANE_HEIGHT
    parts = [f'<svg class="timeline" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    step = _tick_step(span)
    for tick in range(math.floor(span / step) + 1):
        tick_x = x(tick * step)
        parts.append(
            f'<line x1="{tick_x:.2f}" y1="{AXIS_HEIGHT - 4}" x2="{tick_x:.2f}" y2="{height}"/>'
            f'<text x="{tick_x:.2f}" y="{AXIS_HEIGHT - 8}" text-anchor="middle">{_number(round(tick * step, 6))} s</text>'
        )
    for lane, (label, _) in enumerate(lanes):
        middle = AXIS_HEIGHT + (lane + 0.5) * LANE_HEIGHT
        parts.append(f'<text x="{LANE_LABEL_WIDTH - 8}" y="{middle:.1f}" text-anchor="end" dominant-baseline="middle">'
                     f"{escape(_shorten(label, 30))}<title>{escape(label)}</title></text>")
    for lane, stage, record in calls:
        left, right = x(record["started_at"] - start), x(record["finished_at"] - start)
        top = AXIS_HEIGHT + lane * LANE_HEIGHT + (LANE_HEIGHT - BAR_HEIGHT) / 2
        tooltip = (f"{lanes[lane][0]}: {stage} on replica {record['replica']}, "
                   f"{record['started_at'] - start:.2f} s to {record['finished_at'] - start:.2f} s")
        parts.append(
            f'<rect class="bar" data-stage="{stage}" data-lane="{lane}" x="{left:.3f}" y="{top:.1f}" '
            f'width="{right - left:.3f}" height="{BAR_HEIGHT}" rx="3" fill="{STAGE_COLOURS[stage]}">'
            f"<title>{escape(tooltip)}</title></rect>"
        )
        if right - left >= MIN_LABELLED_BAR:
            parts.append(f'<text class="bar-label" x="{(left + right) / 2:.2f}" y="{top + BAR_HEIGHT / 2:.1f}" '
                         f'text-anchor="middle" dominant-baseline="middle">{stage}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span style="background:{colour}"></span>{stage}' for stage, colour in STAGE_COLOURS.items())
    return "".join(parts) + f'<div class="legend small">{legend}</div>'


def _tick_step(span: float, most: int = 6) -> float:
    """The smallest of 1, 2 or 5 × 10^k seconds that puts at most `most` steps on `span` seconds."""
    magnitude = 10.0 ** math.floor(math.log10(span / most))
    return next(multiple * magnitude for multiple in (1, 2, 5, 10) if span / (multiple * magnitude) <= most)


def _shorten(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"
