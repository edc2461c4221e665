"""Runs three prompts through the cascade and saves a screenshot of the run's index.html, the live
run page, for the README (docs/report_page.png). Needs Debian's `chromium` package (and a CJK font,
such as Debian's `fonts-wqy-zenhei`, to show the Chinese prompt).

    .venv/bin/python bench/screenshot_report.py                      # the tiny cascade, local Ray
    .venv/bin/python bench/screenshot_report.py stages.base.steps=10 # any config overrides
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image

from tests.browser import CHROMIUM_PACKAGE, Chromium, find_chromium

PROMPTS = ("a red circle moving to the right", "一个蓝色的方块向上移动", "a green triangle and a yellow square moving left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--png", type=Path, default=REPO_ROOT / "docs" / "report_page.png", help="where the screenshot goes")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--width", type=int, default=1000, help="browser window width in CSS pixels")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for run_cascade.py")
    args = parser.parse_args()
    executable = find_chromium()
    if executable is None:
        sys.exit(f"no chromium: install Debian's `{CHROMIUM_PACKAGE}` package")
    with tempfile.TemporaryDirectory(prefix="report-page-") as folder:
        prompts, out = Path(folder) / "prompts.txt", Path(folder) / "out"
        prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
        subprocess.run([sys.executable, str(REPO_ROOT / "run_cascade.py"), "--prompts-file", str(prompts), "--out", str(out),
                        "--seed", str(args.seed), *args.overrides], cwd=REPO_ROOT, check=True)
        with closing(Chromium(executable, width=args.width)) as browser:
            browser.open((out / "index.html").as_uri())
            if browser.console_errors:
                sys.exit(f"the page logged errors: {browser.console_errors}")
            screenshot = Image.open(io.BytesIO(browser.screenshot_png()))
    # a 256-colour palette keeps the page's flat colours and the previews, at a fraction of the size
    screenshot.convert("RGB").quantize(colors=256).save(args.png, optimize=True)
    print(f"wrote {args.png} ({args.png.stat().st_size // 1024} KiB, {screenshot.width}×{screenshot.height})")


if __name__ == "__main__":
    main()
