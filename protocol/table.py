"""Aligned text tables for command output: the benchmarks' figures and `fediomt ledger report`.

It lives at the bottom so the ledger's CLI and the experiments print tables the same way without importing
the fediomt CLI package.
"""

from __future__ import annotations

import sys


def print_table(rows: list[dict], columns: list[str] | None = None, file=None) -> None:
    """Print rows as an aligned text table (floats to 4 significant digits)."""
    file = file or sys.stdout
    if not rows:
        print("(no rows)", file=file)
        return
    columns = columns or list(rows[0])

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)
