"""Writing a stage's output so that a crash never leaves a half-written result behind."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import SPJError


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling directory to fill; on success it replaces `path`, on any error it is removed.

    Where the system can swap two names atomically (Linux's renameat2), the new result and the old one trade places
    in one step, so at any moment `path` is absent, the old complete result or the new complete result: never a mix,
    and never absent while an old result existed. Elsewhere the swap is two renames (old out of the way, new into
    place); a crash between them leaves the old result in a `.NAME.old-PID-*` sibling, which the next run puts back.

    A SIGKILL runs no cleanup, so a killed run leaves its `.NAME.partial-PID-*` sibling behind (hidden, never read as
    output). The next staged_dir of the same path removes the leftovers of processes no longer running: the PID in
    the name tells a dead run's leftovers from the staging of a live concurrent run on this machine.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(path, "partial"), dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp's is private; an output is for others too (a service user reading a package)
    try:
        _mark(tmp)
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name_output(e, path, tmp)
        raise
    if _exchange(tmp, path):
        _remove(tmp)  # which now holds the old result
        return
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_staging_prefix(path, "old"), dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def name_output(error: BaseException, path: Path, staging: Path) -> None:
    """Make an OSError raised while filling `staging` (a full disk) name `path`, the output the user asked for: a
    failed write() names no file at all, a failed open() the hidden staging folder's."""
    if isinstance(error, OSError) and (error.filename is None or str(error.filename).startswith(str(staging))):
        error.filename = str(path)


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A work directory beside `path`, removed on exit. Beside it rather than in TMPDIR: a rename from it into place
    stays on one file system, and one that a SIGKILL leaves behind is named like staged_dir's, so the next run for
    `path` removes it (a quantizer's scratch holds whole model copies)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path)
    with tempfile.TemporaryDirectory(prefix=_staging_prefix(path, "partial"), dir=path.parent) as tmp:
        yield Path(tmp)


def remove_stale_staging(path: str | os.PathLike) -> list[Path]:
    """Remove the `.NAME.partial-PID-*` and `.NAME.old-PID-*` siblings of `path` whose process is gone, first putting
    an old result back where a crash between two renames left `path` absent. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(partial|old)-(\d+)-[^-]+")
    try:
        siblings = sorted(path.parent.iterdir())
    except FileNotFoundError:
        return []
    removed = []
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or _process_running(int(match[2])):
            continue
        if match[1] == "old" and not (path.exists() or path.is_symlink()):
            with contextlib.suppress(OSError):
                os.replace(sibling / path.name, path)
        _remove(sibling)
        removed.append(sibling)
    return removed


def _staging_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{os.getpid()}-"


def _process_running(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another staging of this process, e.g. in a second thread
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate the process on Windows: leave the leftover alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc ≥ 2.28, musl ≥ 1.2.4
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step. False where that cannot be done: `b` is absent, or the system
    or the filesystem (NFS, some FUSE) lacks the call; the caller renames instead."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# Past this, a graph's weights go to a file of their own: protobuf cannot write or read a message of 2 GiB or more.
INLINE_MAX_BYTES = 1 << 30


def write_onnx(proto, path: str | os.PathLike, external_data: bool | None = None) -> None:
    """Write an ONNX graph as `path`, its tensors of 1 KiB or more in `path`.data beside it when `external_data` (None:
    when the graph passes INLINE_MAX_BYTES). The small ones stay inside: shape inference reads them when loading.
    `proto` gives up its tensors' bytes to the file when they go out (they move)."""
    import onnx

    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in proto.graph.initializer) > INLINE_MAX_BYTES  # ByteSize stops at 2 GiB
    if not external_data:
        onnx.save_model(proto, str(path))
        return
    from onnx.external_data_helper import convert_model_to_external_data, set_external_data, uses_external_data

    from .runtime.reader import WEIGHTS_WRITE_BYTES

    data = path.with_name(f"{path.name}.data")
    convert_model_to_external_data(proto, all_tensors_to_one_file=True, location=data.name, size_threshold=1024)
    with open(data, "wb") as weights:  # onnx's own writer writes a tensor at once (WEIGHTS_WRITE_BYTES: why not)
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor) and tensor.HasField("raw_data"):
                offset, raw = weights.tell(), memoryview(tensor.raw_data)
                for start in range(0, len(raw), WEIGHTS_WRITE_BYTES):
                    weights.write(raw[start:start + WEIGHTS_WRITE_BYTES])
                set_external_data(tensor, data.name, offset, len(raw))
                tensor.ClearField("raw_data")
    onnx.save_model(proto, str(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk: leave no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise


MARKER = ".spj-edge-output"  # in every output directory: what --overwrite may replace


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *, overwrite: bool = False,
                 suffix: str | None = None, resume: bool = False) -> Path:
    """Refuse, before any work, an output that would destroy something: one that is, holds or lies inside one of
    `inputs` (None: an input not given), one that is or holds the working directory, one that exists (unless
    `overwrite`), and even with `overwrite` anything spj-edge could not have written: a directory without our MARKER,
    or for a file output (`suffix`, e.g. ".tar.gz") anything but a plain file of that suffix.
    `resume`: the caller continues the run saved in `out`, which it has checked, and replaces it in its place."""
    out = Path(out)
    _refuse_overlap(out, [Path(p) for p in inputs if p is not None])
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise SPJError(f"{blocking}: is a file, expected a directory (to hold {out})")
    if suffix is not None and out.is_dir():
        raise SPJError(f"{out}: is a directory, expected the path of a {suffix} file to write")
    if resume or not (out.exists() or out.is_symlink()):
        return out
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if not overwrite:
        if suffix is None and empty_dir:
            return out  # made ahead for the output
        raise SPJError(f"{out}: already exists (pass --overwrite to replace it)")
    if suffix is not None:
        if out.is_symlink() or not out.is_file() or not out.name.endswith(suffix):
            raise SPJError(f"{out}: not a {suffix} file that spj-edge writes; --overwrite replaces only those "
                           "(remove it yourself, or choose another --out)")
    elif not empty_dir and (out.is_symlink() or not (out / MARKER).is_file()):
        raise SPJError(f"{out}: not an output directory of spj-edge (it lacks {MARKER}); --overwrite replaces only "
                       "those (remove it yourself, or choose another --out)")
    return out


def _refuse_overlap(out: Path, inputs: list[Path]) -> None:
    """An output replaces what its path names, with everything inside; one inside an input changes that input."""
    real = Path(os.path.realpath(out))
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise SPJError(f"{out}: {'is' if real == cwd else 'holds'} the working directory; an output replaces its "
                       "whole folder: choose a new folder for --out")
    for path in inputs:
        source = Path(os.path.realpath(path))
        if real == source:
            raise SPJError(f"{out}: is also an input ({path}); an output must not replace its input")
        if real in source.parents:
            raise SPJError(f"{out}: holds the input {path}; replacing it would delete that input")
        if source in real.parents:
            raise SPJError(f"{out}: is inside the input {path}; write the output elsewhere")


def claim_output_dir(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), *,
                     overwrite: bool = False) -> Path:
    """For an output filled in place, stage by stage (the demo's folder): check it as check_output does, then make
    it and mark it as ours."""
    out = check_output(out, inputs, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _mark(out)
    return out


def _mark(directory: Path) -> None:
    (directory / MARKER).write_text("written by spj-edge: `--overwrite` may replace this directory\n",
                                    encoding="utf-8")
