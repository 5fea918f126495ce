"""report.html is read in a browser: every table a real HTML table, no Markdown left in it."""

import json
from html.parser import HTMLParser
from pathlib import Path

from fusedeploy.profiling.report import write_report

SAMPLE = Path(__file__).parent / "data" / "sample-report.json"  # a tiny-model build's report.json, every section


class Parsed(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.rows: list[list[str]] = []
        self._stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._stack.append(tag)
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        while self._stack and self._stack.pop() != tag:
            pass

    def handle_data(self, data):
        if "style" in self._stack:
            return
        self.text.append(data)
        in_cell = "td" in self._stack or "th" in self._stack  # not a paragraph's <code> after a table
        if self._stack and self._stack[-1] in ("td", "th", "code", "strong") and self.rows and in_cell:
            self.rows[-1][-1] += data


def test_every_table_in_report_html_is_an_html_table(tmp_path):
    report = json.loads(SAMPLE.read_text())
    write_report(report, tmp_path)
    page = Parsed()
    page.feed((tmp_path / "report.html").read_text())
    md = (tmp_path / "report.md").read_text()
    md_tables = sum(1 for line in md.splitlines() if line.startswith("|---"))
    assert md_tables == 8  # budgets, curve, tasks, zero-shot, projection, artifacts, candidates, serving
    assert page.tags.count("table") == md_tables
    assert "pre" not in page.tags
    text = "".join(page.text)
    assert "|---" not in text and not any(line.lstrip().startswith("|") for line in text.splitlines())
    assert "`" not in text and "**" not in text  # inline Markdown became <code> / <strong>
    assert ["max_memory_gb", "0.043", "projected", "<= 4", "PASS"] in page.rows
    assert ["tiny_choice", "acc", "6", "0.5000", "0.3333", "+0.1667"] in page.rows
    assert ["compressed", "deployed artifact compressed-gguf-f16 in llama.cpp", "20", "0.3000 +/- 0.1025",
            "0.2500 +/- 0.0968"] in page.rows
    assert ["min_zero_shot_retention", "1.000", "measured", ">= 0.9", "PASS"] in page.rows
    assert "| tiny_choice | acc | 6 |" in md  # report.md keeps its Markdown tables


def test_report_html_fits_the_page(tmp_path):
    write_report(json.loads(SAMPLE.read_text()), tmp_path)
    page = (tmp_path / "report.html").read_text()
    assert 'name="viewport"' in page
    assert "code{overflow-wrap:anywhere" in page and "img{max-width:100%" in page
    assert "table{border-collapse:collapse;max-width:100%" in page
