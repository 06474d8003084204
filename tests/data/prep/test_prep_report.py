"""Report: JSON round trip, the text table, the HTML page with its SVG funnel (bar widths proportional
to the documents left), escaping of removed text."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

from parallax.data.prep.report import Report, StageReport


def _report() -> Report:
    return Report(input="corpus/", out="out/", shards=2, docs_read=1000, bytes_read=4_000_000, docs_kept=600,
                  bytes_kept=2_000_000, tokens=2_000_599, elapsed_s=2.0, workers=4, stages=[
                      StageReport(name="gopher_quality", docs_in=1000, docs_out=800, bytes_in=4_000_000,
                                  bytes_out=3_000_000, seconds=0.5,
                                  removed=[{"id": "a.jsonl:3", "reason": "word count 12 < 50",
                                            "text": "<script>alert(1)</script> & more"}]),
                      StageReport(name="exact_dedup", docs_in=800, docs_out=600, bytes_in=3_000_000,
                                  bytes_out=2_000_000),
                      StageReport(name="pii", docs_in=600, docs_out=600, bytes_in=2_000_000, bytes_out=2_000_000,
                                  counts={"email": 7, "ip": 2})],
                  read_errors=[{"path": "b.jsonl", "line": 9, "message": "invalid JSON"}], read_errors_total=1)


def test_json_round_trip_and_throughput() -> None:
    report = _report()
    data = json.loads(report.to_json())
    assert data["mb_per_s"] == 2.0 and data["stages"][0]["mb_per_s"] == 8.0 and data["stages"][1]["mb_per_s"] is None
    assert Report.from_dict(data) == report
    assert report.stage("pii").counts == {"email": 7, "ip": 2} and report.stage("exact_dedup").docs_removed == 200


def test_table() -> None:
    lines = _report().table().splitlines()
    assert lines[0].split() == ["stage", "docs", "in", "docs", "out", "removed", "MB", "in", "MB", "out", "MB/s",
                                "counts"]
    assert lines[2].split() == ["gopher_quality", "1,000", "800", "20.0%", "4.00", "3.00", "8.0"]
    assert lines[4].split() == ["pii", "600", "600", "0.0%", "2.00", "2.00", "-", "email", "7,", "ip", "2"]
    assert "600 of 1,000 documents kept" in lines[6] and "2,000,599 tokens" in lines[6]
    assert lines[7] == "1 read error(s) skipped, e.g. b.jsonl, line 9: invalid JSON"


def test_html_funnel_and_escaping() -> None:
    page = _report().to_html()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    svg = ET.fromstring(re.search(r"<svg.*?</svg>", page, re.S).group(0))  # well-formed XML
    bars = [float(r.get("width")) for r in svg.iter("{http://www.w3.org/2000/svg}rect")]
    assert len(bars) == 4  # read + 3 stages
    full = bars[0]
    assert [round(b / full, 6) for b in bars] == [1.0, 0.8, 0.6, 0.6]
    assert "b.jsonl, line 9: invalid JSON" in page


def test_empty_report_renders() -> None:
    empty = Report(input="x", out="y")
    assert "0 of 0 documents kept" in empty.table()
    ET.fromstring(empty.funnel_svg())
