"""The tables a command prints on stderr: every stage's closing summary, eval's and bench's figures, the demo's."""
from __future__ import annotations

# At import, not at the first table: a stage of a runtime-only install (which has no rich) must stop before it writes
# anything, not after.
from rich.console import Console
from rich.table import Table


def print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    """The short table every long-running stage ends with."""
    print_table(title, None, rows)


def print_table(title: str, header: list[str] | None, rows: list[tuple]) -> None:
    """A table on stderr (stdout stays for what a command produces); floats to 4 significant digits, None as "-"."""
    def cell(value) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    table = Table(show_header=header is not None)
    columns = header if header is not None else [""] * (len(rows[0]) if rows else 0)
    for i, name in enumerate(columns):
        table.add_column(name, style="bold" if i == 0 else None, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*map(cell, row))
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file: rich would wrap at 80 columns
        console = Console(stderr=True, width=160)
    console.print(title, style="bold", soft_wrap=True)
    console.print(table)
