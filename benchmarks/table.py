"""The one table a benchmark prints: a row per measurement, each with its unit and the target it is held to."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("section", "measure", "value", "unit", "target")
FAILED = "failed: "  # a value that starts so says why a measurement could not be made


class Table:
    """Rows as they are measured. Each row is printed at once and, when files are given, the files
    are rewritten: a benchmark cut short by a time limit still leaves every row measured before."""

    def __init__(self, json_path: str | Path | None = None, markdown_path: str | Path | None = None):
        self.rows: list[tuple[str, str, str, str, str]] = []
        self.json_path = Path(json_path) if json_path else None
        self.markdown_path = Path(markdown_path) if markdown_path else None

    def add(self, section: str, measure: str, value: float | str, unit: str, target: str = "") -> None:
        shown = value if isinstance(value, str) else f"{value:.4g}"
        self.rows.append((section, measure, shown, unit, target))
        print(f"  {section}: {measure} = {shown} {unit}", flush=True)
        self.save()

    def failed(self, section: str, measure: str, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.add(section, measure, f"{FAILED}{type(error).__name__}: {reason}"[:300], "")

    @property
    def failures(self) -> list[tuple[str, str, str, str, str]]:
        return [row for row in self.rows if row[2].startswith(FAILED)]

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(COLUMNS)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                          *map(line, self.rows)])

    def save(self) -> None:
        if self.json_path:
            self.json_path.write_text(json.dumps([dict(zip(COLUMNS, row)) for row in self.rows], indent=2))
        if self.markdown_path:
            self.markdown_path.write_text(self.render() + "\n")
