"""Writing a stage's output so that a crash never leaves a half-written result behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import SPJError


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; on success it replaces `path`, on any error it is removed.

    The swap is two renames (old out of the way, new into place), so at any moment `path` is either absent, the old
    complete result or the new complete result: never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp's is private; an output is for others too (a service user reading a package)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SPJError(f"{path}: {'is a directory, expected a JSON file' if path.is_dir() else 'no such file'}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPJError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SPJError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def refuse_existing_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise SPJError(f"{path}: already exists (pass --overwrite to replace it)")


def print_summary(title: str, rows: list[tuple[str, object]]) -> None:
    """The short table every long-running stage ends with."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console(stderr=True)
    console.print(title, style="bold", soft_wrap=True)
    console.print(table)
