"""The run's report: per stage, documents and bytes in and out, counts (e.g. PII replacements by
kind), examples of what it removed and its time; read errors; tokens written. Written as JSON and as a
small self-contained HTML page (an inline SVG funnel, no plotting library); ``table()`` is the text
the command line prints.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StageReport", "Report", "HEAD_CHARS"]

HEAD_CHARS = 300  # text kept per removed example in the report (samples/removed.jsonl has the whole text)


@dataclass
class StageReport:
    """One stage's effect. ``removed``: up to ``samples`` examples {"id", "reason", "text"} (text cut to
    ``HEAD_CHARS``), chosen by a hash of the id so they spread over the corpus and do not depend on the
    worker count. ``seconds``: time in the stage summed over workers (CPU-seconds, not wall time)."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    removed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def docs_removed(self) -> int:
        return self.docs_in - self.docs_out

    @property
    def mb_per_s(self) -> float | None:
        """Input bytes per CPU-second of this stage, in MB/s (None when too fast to time)."""
        return self.bytes_in / 1e6 / self.seconds if self.seconds > 0 else None


@dataclass
class Report:
    """The whole run. ``read_errors``: {"path", "line", "message"} for input skipped with
    ``on_error="skip"`` (the first 100; ``read_errors_total`` counts them all). ``elapsed_s``: wall time of the run (of the last run when it resumed)."""

    input: str
    out: str
    shards: int = 0
    docs_read: int = 0
    bytes_read: int = 0
    docs_kept: int = 0
    bytes_kept: int = 0
    tokens: int = 0
    stages: list[StageReport] = field(default_factory=list)
    read_errors: list[dict[str, Any]] = field(default_factory=list)
    read_errors_total: int = 0
    elapsed_s: float = 0.0
    executor: str = "local"
    workers: int = 1

    @property
    def mb_per_s(self) -> float | None:
        """Input MB per second of wall time."""
        return self.bytes_read / 1e6 / self.elapsed_s if self.elapsed_s > 0 else None

    def stage(self, name: str) -> StageReport:
        """The report of the stage ``name``; KeyError when it did not run."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"stage {name!r} did not run; ran: {', '.join(s.name for s in self.stages)}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mb_per_s"] = self.mb_per_s
        for stage, entry in zip(self.stages, data["stages"]):
            entry["mb_per_s"] = stage.mb_per_s
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        data = {k: v for k, v in data.items() if k != "mb_per_s"}
        stages = [StageReport(**{k: v for k, v in s.items() if k != "mb_per_s"}) for s in data.pop("stages", [])]
        return cls(**data, stages=stages)

    def table(self) -> str:
        """A fixed-width text table: one row per stage, then the totals."""
        header = ("stage", "docs in", "docs out", "removed", "MB in", "MB out", "MB/s", "counts")
        rows = [header]
        for s in self.stages:
            share = f"{100 * s.docs_removed / s.docs_in:.1f}%" if s.docs_in else "-"
            speed = f"{s.mb_per_s:.1f}" if s.mb_per_s is not None else "-"
            counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
            rows.append((s.name, f"{s.docs_in:,}", f"{s.docs_out:,}", share, f"{s.bytes_in / 1e6:.2f}",
                         f"{s.bytes_out / 1e6:.2f}", speed, counts))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = []
        for n, row in enumerate(rows):
            cells = [cell.ljust(w) if i in (0, len(row) - 1) else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))]
            lines.append("  ".join(cells).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        speed = f", {self.mb_per_s:.2f} MB/s" if self.mb_per_s is not None else ""
        lines.append("")
        lines.append(f"{self.docs_kept:,} of {self.docs_read:,} documents kept ({self.bytes_kept / 1e6:.2f} of "
                     f"{self.bytes_read / 1e6:.2f} MB), {self.tokens:,} tokens; {self.shards} shard(s) in "
                     f"{self.elapsed_s:.1f}s{speed} ({self.executor}, {self.workers} worker(s))")
        if self.read_errors:
            lines.append(f"{self.read_errors_total} read error(s) skipped, e.g. {_where(self.read_errors[0])}: "
                         f"{self.read_errors[0]['message']}")
        return "\n".join(lines)

    def to_html(self) -> str:
        """A self-contained page: the funnel (inline SVG), the stage table, removed examples, read errors."""
        esc = html.escape
        parts = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
                 f"<title>parallax prep report: {esc(self.out)}</title>",
                 "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}"
                 "table{border-collapse:collapse}td,th{padding:.2em .6em;border-bottom:1px solid #ddd}"
                 "td.n{text-align:right}pre{white-space:pre-wrap;background:#f6f6f6;padding:.4em;margin:.2em 0}"
                 "</style></head><body>",
                 f"<h1>parallax prep: {esc(self.input)} &rarr; {esc(self.out)}</h1>",
                 f"<p>{self.docs_kept:,} of {self.docs_read:,} documents kept, {self.tokens:,} tokens, "
                 f"{self.shards} shard(s), {self.elapsed_s:.1f}s ({esc(self.executor)}, {self.workers} "
                 "worker(s)).</p>", "<h2>Funnel</h2>", self.funnel_svg(), "<h2>Stages</h2>",
                 "<table><tr><th>stage</th><th>docs in</th><th>docs out</th><th>MB in</th><th>MB out</th>"
                 "<th>counts</th></tr>"]
        for s in self.stages:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items()))
            parts.append(f"<tr><td>{esc(s.name)}</td><td class=n>{s.docs_in:,}</td><td class=n>{s.docs_out:,}</td>"
                         f"<td class=n>{s.bytes_in / 1e6:.2f}</td><td class=n>{s.bytes_out / 1e6:.2f}</td>"
                         f"<td>{esc(counts)}</td></tr>")
        parts.append("</table><h2>Removed examples</h2>")
        for s in self.stages:
            if not s.removed:
                continue
            parts.append(f"<h3>{esc(s.name)} ({s.docs_removed:,} removed)</h3>")
            for example in s.removed:
                parts.append(f"<p><b>{esc(example['id'])}</b>: {esc(example['reason'])}</p>"
                             f"<pre>{esc(example['text'])}</pre>")
        if self.read_errors:
            parts.append(f"<h2>Read errors ({self.read_errors_total}; the first {len(self.read_errors)})</h2><ul>")
            parts.extend(f"<li>{esc(_where(e))}: {esc(e['message'])}</li>" for e in self.read_errors)
            parts.append("</ul>")
        parts.append("</body></html>")
        return "\n".join(parts)

    def funnel_svg(self, width: int = 640, bar_height: int = 22) -> str:
        """Documents left after each stage as horizontal bars, widths proportional to documents read."""
        rows = [("read", self.docs_read)] + [(s.name, s.docs_out) for s in self.stages]
        label_w, gap = 150, 6
        height = len(rows) * (bar_height + gap) + gap
        scale = (width - label_w - 90) / max(self.docs_read, 1)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
               f'role="img" aria-label="documents left after each stage">']
        for i, (name, docs) in enumerate(rows):
            y = gap + i * (bar_height + gap)
            out.append(f'<text x="{label_w - 8}" y="{y + bar_height * 0.7:.1f}" text-anchor="end" '
                       f'font-size="13">{html.escape(name)}</text>')
            out.append(f'<rect x="{label_w}" y="{y}" width="{docs * scale:.1f}" height="{bar_height}" '
                       f'fill="#4c78a8"><title>{html.escape(name)}: {docs:,}</title></rect>')
            out.append(f'<text x="{label_w + docs * scale + 6:.1f}" y="{y + bar_height * 0.7:.1f}" '
                       f'font-size="13">{docs:,}</text>')
        out.append("</svg>")
        return "\n".join(out)


def _where(error: dict[str, Any]) -> str:
    return error["path"] if error.get("line") is None else f"{error['path']}, line {error['line']}"
