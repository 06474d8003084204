"""Plain-text tables with aligned columns and units in the headers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Column", "format_table"]


@dataclass(frozen=True)
class Column:
    """One table column: the row key it shows, its header (with the unit), and a format spec.

    ``fmt`` is a ``format()`` spec such as ".3f" or ",d"; numbers are multiplied by ``scale``
    first (e.g. 1e-6 to show parameters in millions). Missing or None values print as "-".
    Text columns are left-aligned, numbers right-aligned.
    """

    key: str
    header: str
    fmt: str = ""
    scale: float = 1.0

    def render(self, row: Mapping[str, object]) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if isinstance(value, float) and value != value:  # NaN
            return "nan"
        if self.scale != 1.0 and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value * self.scale
        try:
            return format(value, self.fmt)
        except (TypeError, ValueError):
            return str(value)


def format_table(rows: Iterable[Mapping[str, object]], columns: Sequence[Column]) -> str:
    """The rows as an aligned text table: header line, rule, one line per row."""
    rows = list(rows)
    cells = [[col.render(row) for col in columns] for row in rows]
    numeric = [
        all(isinstance(row.get(col.key), (int, float)) or row.get(col.key) is None for row in rows)
        for col in columns
    ]
    widths = [max([len(col.header)] + [len(line[i]) for line in cells]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line([col.header for col in columns]), "  ".join("-" * w for w in widths)]
    out.extend(line(c) for c in cells)
    return "\n".join(out)
