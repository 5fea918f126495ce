"""Render a sign-off report the way a person sees it: headless Chromium, one PNG per page width.

    python benchmarks/report_screenshot.py                       # the sample report tests/data ships
    python benchmarks/report_screenshot.py --report build/report/report.json --out /tmp/shots

Writes report.html (re-rendered from report.json by the current code) and report-<width>.png for each
--width, and prints how wide the laid-out page is at that width (a copy of the page with a one-line
script, read back through Chromium's --dump-dom): wider than the viewport means something does not fit,
and the script exits 1. Needs chromium on PATH (Debian: `apt-get install chromium`); without it, it
says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SAMPLE = ROOT / "tests" / "data" / "sample-report.json"


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(browser: str, page: Path, png: Path, width: int, height: int) -> None:
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars=false", "--mute-audio",
         f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)


_MEASURE = ("<script>var d = document.documentElement, n = 0; document.querySelectorAll('div.table')"
            ".forEach(function (t) { if (t.scrollWidth > t.clientWidth) n++; }); "
            "document.body.setAttribute('data-widths', d.scrollWidth + ' ' + d.clientWidth + ' ' + n)"
            "</script></body>")


def page_width(browser: str, page: Path, width: int, height: int) -> tuple[int, int, int]:
    """(the laid-out page's width, the viewport's width) in CSS pixels at this window width, and how
    many tables are wider than their box (they scroll sideways inside it rather than widen the page)."""
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _MEASURE), encoding="utf-8")
    try:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
             "--dump-dom", probe.resolve().as_uri()],
            check=True, capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    match = re.search(r'data-widths="(\d+) (\d+) (\d+)"', dom)
    if not match:
        raise RuntimeError("chromium returned no layout width")
    return int(match.group(1)), int(match.group(2)), int(match.group(3))


def main() -> int:
    from fusedeploy.profiling.report import write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", type=Path, default=SAMPLE, help="a report.json (default: the tests' sample)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/fusedeploy-report-shots"))
    ap.add_argument("--width", type=int, action="append", help="window width in CSS pixels (repeatable)")
    ap.add_argument("--height", type=int, default=4000)
    args = ap.parse_args()
    browser = chromium()
    if browser is None:
        print("no chromium on PATH (Debian: apt-get install chromium); nothing rendered", file=sys.stderr)
        return 2
    write_report(json.loads(args.report.read_text()), args.out)
    page = args.out / "report.html"
    too_wide = []
    for width in args.width or [1280, 800, 480]:
        png = args.out / f"report-{width}.png"
        screenshot(browser, page, png, width, args.height)
        laid_out, viewport, scrolling = page_width(browser, page, width, args.height)
        fits = laid_out <= viewport
        too_wide += [] if fits else [width]
        print(f"{png}: viewport {viewport} px, page {laid_out} px: {'fits' if fits else 'WIDER THAN THE VIEWPORT'}"
              f"; {scrolling} table(s) scroll sideways in their box")
    return 1 if too_wide else 0


if __name__ == "__main__":
    sys.exit(main())
