"""Reading a package (a directory, or its .tar.gz), every file checked against spj.json first.

The manifest, the tokenizer and the graph (model.onnx: the nodes and the small tensors) are read once, as bytes, and
those very bytes are hashed and used: what was verified is what runs, whatever happens to the files afterwards.

The weights (model.onnx.data) are the model's size, so they are hashed as they stream past and never held in Python:
onnxruntime maps them from a file, which makes them the process's one copy of the model (a package handed over as
bytes cost twice its size). That file is the verified one itself, held open: in a directory package, the package's
own file, opened once, hashed through that descriptor and given to onnxruntime as /proc/self/fd/N (so a file swapped
in after the check is not the one loaded; where /proc is missing, the file is opened again by name: a gap between
verification and load that only someone who can write the package folder can use); in a .tar.gz, a copy inflated into
a private temporary folder as it is hashed, deleted with the package. Only these two file names are ever written or
linked there, never a member's own name.

An archive is refused whole if any member is a link, a device, an absolute path, a path that leaves the package folder
or a second copy of a name. A file's size is checked (against the manifest, or a limit) before any of it is read, and
no package file may be a link, a device or a FIFO.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import SPJError
from ..sampling import SamplingParams
from ..tokenizer import CHAT_TEMPLATE_MAX_CHARS, EOS_IDS_MAX

MANIFEST = "spj.json"
MODEL = "model.onnx"
WEIGHTS = "model.onnx.data"  # the graph's tensors of 1 KiB or more, as ONNX external data
TOKENIZER = "tokenizer.json"
# Version 2 keeps the weights in WEIGHTS; a version 1 package (every tensor inside model.onnx) is still read.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
# The most bytes each file may have, checked before it is read, so that a crafted package can't make us read or
# inflate gigabytes. A real manifest is a few KB; protobuf can't parse a graph of 2 GiB or more; the largest real
# tokenizer.json files (Gemma's) are about 33 MB; 64 GiB of weights is a 16-billion-parameter float32 model.
MANIFEST_MAX_BYTES = 1 << 20
MAX_BYTES = {MANIFEST: MANIFEST_MAX_BYTES, MODEL: (1 << 31) - 1, WEIGHTS: 64 << 30, TOKENIZER: 64 << 20}
OTHER_MAX_BYTES = 64 << 20  # the Hugging Face files a package carries for other tools (tokenizer_config.json, ...)
CHUNK = 1 << 20
# A page fault in a file mapping maps the whole page-cache folio the page lies in, and a token's embedding row is read
# through onnxruntime's mapping of WEIGHTS: the larger the folios, the more of the table a generation holds. Linux
# caches a file in folios as large as the writes that wrote it and, reading ahead, as large as the readahead window
# (8 MB on some VMs): then a run's rows map most of the table (SmolLM2-135M int4: a peak RSS of 248 MB for 226; 100
# random 4 KB reads of its weights map 86-105 MB of them, 11 MB in folios of at most 64 KiB). So the weights are
# written this much at a time and hashed without readahead.
WEIGHTS_WRITE_BYTES = 64 << 10
ARCHIVE_MAX_BYTES = sum(MAX_BYTES.values())  # all members of an archive together, and the archive itself
ARCHIVE_MAX_MEMBERS = 64
LARGEST = 1 << 20  # the largest vocabulary, context or token count a manifest may give (real ones: 256 K at most)
SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")
IO_NAMES_MAX = 3 + 2 * 1024  # ids, mask, positions and a key and a value per layer, at the most layers allowed
# What the runtime reads from spj.json, and the least and the greatest value of its integers.
INTEGERS = {
    **{("model", key): (1, 1024) for key in ("num_hidden_layers", "num_key_value_heads", "head_dim")},
    ("model", "vocab_size"): (1, LARGEST), ("model", "max_position_embeddings"): (1, LARGEST),
    ("generation", "max_new_tokens"): (0, LARGEST), ("generation", "top_k"): (0, LARGEST),
}
# Ids of the model's vocabulary; bos and eos may be null (a tokenizer without them). eos_token_ids (every id that ends
# generation), add_bos_token and the top-level chat_template came later: a manifest without them is read as before.
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
REQUIRED = [
    *INTEGERS, *(("generation", key) for key in SAMPLING if ("generation", key) not in INTEGERS),
    *(("special_tokens", key) for key in SPECIAL_IDS),
    ("graph",), ("opset",), ("quantization", "mode"),
    *(("files", name, key) for name in (MODEL, TOKENIZER) for key in ("sha256", "bytes")),
]


@dataclass(frozen=True)
class Package:
    source: Path
    manifest: dict
    files: dict[str, bytes]  # MODEL (its graph) and TOKENIZER, verified
    # Where onnxruntime opens MODEL with its WEIGHTS of `weights_bytes` bytes, both verified; None: the graph holds
    # every tensor and is loaded from files[MODEL].
    model_folder: Path | None = None
    weights_bytes: int | None = None
    holding: object = field(default=None, repr=False, compare=False)  # keeps model_folder's files while we live

    @property
    def config(self) -> dict:
        return self.manifest["model"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_package(path: str | os.PathLike) -> Package:
    if not os.fspath(path):  # Path("") would be the working directory
        raise SPJError("an empty path: expected a package directory or its .tar.gz")
    path = Path(path)
    if path.is_dir():
        return _read(path, _DirectoryFiles(path))
    if not path.exists():
        raise SPJError(f"{path}: no such package")
    if not path.is_file():  # a device or a FIFO could be read forever
        raise SPJError(f"{path}: not a package (not a regular file; expected a directory with {MANIFEST}, or its "
                       ".tar.gz)")
    if path.stat().st_size > ARCHIVE_MAX_BYTES:
        raise SPJError(f"{path}: {path.stat().st_size} bytes, more than the {ARCHIVE_MAX_BYTES} a package may have")
    if not tarfile.is_tarfile(path):
        raise SPJError(f"{path}: not a package (expected a directory with {MANIFEST}, or its .tar.gz)")
    try:
        with tarfile.open(path) as tar:
            return _read(path, _TarFiles(path, tar))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise SPJError(f"{path}: damaged archive ({e})") from None


def _read(source: Path, files) -> Package:
    manifest = _parse_manifest(files.read(MANIFEST, None), files.where(MANIFEST))
    verified = {}
    for name in (MODEL, TOKENIZER):
        entry = manifest["files"][name]
        data = files.read(name, entry["bytes"])  # the size is checked before a byte is read
        _check_hash(files.where(name), sha256(data), entry)
        verified[name] = data
    weights = manifest["files"].get(WEIGHTS)
    if weights is None:
        return Package(source, manifest, verified)
    folder, holding = files.pin(verified[MODEL], weights)
    return Package(source, manifest, verified, folder, weights["bytes"], holding)


def _check_hash(where: str, digest: str, entry: dict) -> None:
    if digest != entry["sha256"]:
        raise SPJError(f"{where}: sha256 differs from {MANIFEST}'s: the file was changed or damaged after packaging; "
                       "refusing to load it")


def _copy_hashing(source: BinaryIO, target: BinaryIO | None, size: int, where: str) -> str:
    """The sha256 of `source`'s `size` bytes, read a chunk at a time (and written to `target`, if any), `source` a
    package's own file read without readahead, `target` written in small pieces (WEIGHTS_WRITE_BYTES: why)."""
    if target is None and hasattr(os, "posix_fadvise"):
        os.posix_fadvise(source.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
    digest, left = hashlib.sha256(), size
    while left:
        chunk = source.read(min(CHUNK, left))
        if not chunk:
            raise SPJError(f"{where}: changed while it was being read; refusing to load it")
        digest.update(chunk)
        if target is not None:
            piece = memoryview(chunk)
            for start in range(0, len(chunk), WEIGHTS_WRITE_BYTES):
                target.write(piece[start:start + WEIGHTS_WRITE_BYTES])
        left -= len(chunk)
    return digest.hexdigest()


PINNED_PREFIX = "spj-edge-package-"


class _PinnedFolder:
    """A private temporary folder holding MODEL and WEIGHTS for onnxruntime to open by path, removed (and any
    descriptors it holds closed) when the package that owns it is collected. A process killed outright leaves its
    folder behind (a tar's weights: gigabytes), so each new one first removes those of processes no longer running:
    the PID is in the name."""

    def __init__(self):
        _remove_abandoned_folders()
        self.path = Path(tempfile.mkdtemp(prefix=f"{PINNED_PREFIX}{os.getpid()}-"))  # mode 0700
        self.descriptors: list[int] = []
        weakref.finalize(self, _remove_pinned, self.path, self.descriptors)


def _remove_abandoned_folders() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{PINNED_PREFIX}*-*"):
        pid = folder.name.removeprefix(PINNED_PREFIX).partition("-")[0]
        try:
            ours = folder.lstat().st_uid == os.getuid()
        except OSError:  # gone already
            continue
        if ours and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether `pid` is a live process: a killed one that its parent has not reaped yet (a zombie) still answers
    kill(pid, 0) but will never remove its folder."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):  # no /proc (macOS), or gone meanwhile
        return True
    return state != "Z"


def _remove_pinned(path: Path, descriptors: list[int]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    for fd in descriptors:
        os.close(fd)


def _pinnable() -> bool:
    """Whether /proc/self/fd/N opens the very file descriptor N has open (Linux, Android)."""
    return os.path.isdir("/proc/self/fd")


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPJError(f"{where}: not valid JSON ({e})") from None
    except RecursionError:
        raise SPJError(f"{where}: not a spj-edge package manifest (nested too deeply)") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise SPJError(f"{where}: not a spj-edge package manifest")
    version = manifest["format_version"]
    if type(version) is not int or version not in READS_VERSIONS:  # JSON's true equals 1 in Python
        raise SPJError(f"{where}: package format version {version!r}; this runtime reads versions "
                       f"{', '.join(map(str, READS_VERSIONS))} (update spj-edge or repackage the model)")
    missing = [".".join(path) for path in REQUIRED if not _has(manifest, path)]
    if missing:
        raise SPJError(f"{where}: incomplete manifest, it lacks {', '.join(missing)}")
    _check_values(manifest, where)
    _check_files(manifest["files"], where)
    return manifest


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_values(manifest: dict, where: str) -> None:
    """Values of the right kind and size: a damaged or hand-edited manifest fails here, naming its entry, rather than
    as a TypeError in the middle of generation or an allocation of gigabytes. (Whether they describe the graph is
    checked against the graph itself, in graph.py.)"""
    for (section, key), (least, most) in INTEGERS.items():
        value = manifest[section][key]
        if not (_is_integer(value) and least <= value <= most):
            raise SPJError(f"{where}: {section}.{key} must be an integer from {least} to {most}, got {value!r}")
    _check_special_tokens(manifest["special_tokens"], manifest["model"]["vocab_size"], where)
    io = manifest.get("io")
    if io is not None and not (isinstance(io, dict) and all(
            isinstance(io.get(kind), list) and len(io[kind]) <= IO_NAMES_MAX
            and all(isinstance(name, str) for name in io[kind]) for kind in ("inputs", "outputs"))):
        raise SPJError(f"{where}: io must hold the graph's inputs and outputs as lists of at most {IO_NAMES_MAX} names")
    template = manifest.get("chat_template")
    if not (template is None or isinstance(template, str) and len(template) <= CHAT_TEMPLATE_MAX_CHARS):
        raise SPJError(f"{where}: chat_template must be null or text of at most {CHAT_TEMPLATE_MAX_CHARS} characters")
    generation = manifest["generation"]
    for key in SAMPLING:
        if not isinstance(generation[key], (int, float)) or isinstance(generation[key], bool):
            raise SPJError(f"{where}: generation.{key} must be a number, got {generation[key]!r}")
    try:
        SamplingParams(**{key: generation[key] for key in SAMPLING})
    except SPJError as e:
        raise SPJError(f"{where}: generation defaults: {e}") from None


def _check_special_tokens(special: dict, vocab_size: int, where: str) -> None:
    def check_id(key: str, value, nullable: bool) -> None:
        if value is None and nullable:
            return
        if not (_is_integer(value) and 0 <= value < vocab_size):
            raise SPJError(f"{where}: special_tokens.{key} is {value!r}, not an id of the model's vocabulary of "
                           f"{vocab_size}")

    for key in SPECIAL_IDS:
        check_id(key, special[key], nullable=key != "pad_token_id")
    if "eos_token_ids" in special:
        eos = special["eos_token_ids"]
        if not (isinstance(eos, list) and len(eos) <= EOS_IDS_MAX):
            raise SPJError(f"{where}: special_tokens.eos_token_ids must be a list of at most {EOS_IDS_MAX} ids")
        for value in eos:
            check_id("eos_token_ids", value, nullable=False)
        if not isinstance(special.get("add_bos_token"), bool):
            raise SPJError(f"{where}: special_tokens.add_bos_token must be true or false")


def _check_files(files: dict, where: str) -> None:
    """Every entry names a file of the package folder itself; those the runtime reads have a size it may read."""
    for name, entry in files.items():
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise SPJError(f"{where}: files lists {name!r}, which is not a file of the package folder")
        if name == WEIGHTS and not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
                                    and "bytes" in entry):
            raise SPJError(f"{where}: files.{name} must give its sha256 and bytes")
        if name in (MODEL, TOKENIZER, WEIGHTS):
            size = entry["bytes"]
            if not (_is_integer(size) and 0 <= size <= MAX_BYTES[name]):
                raise SPJError(f"{where}: files.{name}.bytes must be an integer from 0 to {MAX_BYTES[name]}, "
                               f"got {size!r}")


def _has(obj, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


def _check_size(where: str, name: str, actual: int, size: int | None) -> None:
    """`size`: the manifest's; None: any size up to the file's limit."""
    if size is None and actual > MAX_BYTES[name]:
        raise SPJError(f"{where}: {actual} bytes, more than the {MAX_BYTES[name]} a {name} may have; refusing to "
                       "read it")
    if size is not None and actual != size:
        raise SPJError(f"{where}: {actual} bytes where {MANIFEST} says {size}: the file was changed or damaged after "
                       "packaging; refusing to load it")


class _DirectoryFiles:
    def __init__(self, root: Path):
        self.root = root

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str, size: int | None) -> bytes:
        fd, length = self._open(name, size)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(length + 1)
        except OSError as e:
            raise SPJError(f"{self.where(name)}: cannot read ({e.strerror})") from None
        finally:
            os.close(fd)
        if len(data) != length:
            raise SPJError(f"{self.where(name)}: changed while it was being read; refusing to load it")
        return data

    def pin(self, graph: bytes, entry: dict) -> tuple[Path, _PinnedFolder | None]:
        """A folder where MODEL and WEIGHTS are the files verified, held open (see the module's text)."""
        if not _pinnable():
            fd, length = self._open(WEIGHTS, entry["bytes"])
            with os.fdopen(fd, "rb") as f:
                _check_hash(self.where(WEIGHTS), _copy_hashing(f, None, length, self.where(WEIGHTS)), entry)
            return self.root, None
        folder = _PinnedFolder()
        for name in (MODEL, WEIGHTS):
            fd, length = self._open(name, entry["bytes"] if name == WEIGHTS else len(graph))
            folder.descriptors.append(fd)
            try:
                with os.fdopen(os.dup(fd), "rb") as f:
                    if name == MODEL and f.read() != graph:
                        raise SPJError(f"{self.where(name)}: changed while it was being read; refusing to load it")
                    if name == WEIGHTS:
                        _check_hash(self.where(name), _copy_hashing(f, None, length, self.where(name)), entry)
            except OSError as e:
                raise SPJError(f"{self.where(name)}: cannot read ({e.strerror})") from None
            # onnxruntime resolves the links (to the package's files, wherever they now are) and refuses weights
            # outside the graph's folder: both go through the same kind of link.
            os.symlink(f"/proc/self/fd/{fd}", folder.path / name)
        return folder.path, folder

    def _open(self, name: str, size: int | None) -> tuple[int, int]:
        """A descriptor of the package's file itself and its size, checked before a byte is read."""
        path = self.root / name
        # Not following a link, and not waiting on a FIFO: a package's files are the files themselves, as in a tar.
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise SPJError(f"{path}: missing from the package") from None
        except OSError as e:  # unreadable input is bad input (exit 2), as everywhere else
            if e.errno == errno.ELOOP:
                raise SPJError(f"{path}: a symbolic link; a package holds its files themselves") from None
            raise SPJError(f"{path}: cannot read ({e.strerror})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = "directory" if stat.S_ISDIR(info.st_mode) else "FIFO, device or socket"
                raise SPJError(f"{path}: missing from the package (a {kind} stands in its place)")
            _check_size(str(path), name, info.st_size, size)
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size


class _TarFiles:
    """The members of a package archive: one folder holding the package files, nothing else.

    The archive is walked one header at a time and refused as soon as a header is wrong, before the member's data is
    inflated (moving past a member of a .tar.gz inflates it)."""

    def __init__(self, path: Path, tar: tarfile.TarFile):
        self.path, self.tar = path, tar
        self.members: dict[str, tarfile.TarInfo] = {}
        tops, seen, total = set(), set(), 0
        for count, m in enumerate(tar, 1):
            if count > ARCHIVE_MAX_MEMBERS:
                raise SPJError(f"{path}: more than {ARCHIVE_MAX_MEMBERS} members; a package has a few files")
            parts = PurePosixPath(m.name).parts  # `./nano.spj/x` as `tar czf p.tar.gz ./nano.spj` writes it: nano.spj/x
            if m.name.startswith("/"):
                self._refuse(m, "an absolute path")
            if ".." in parts:
                self._refuse(m, "a path that leaves the package folder")
            if m.issym() or m.islnk():
                self._refuse(m, f"a link (to {m.linkname!r})")
            if not (m.isfile() or m.isdir()):
                self._refuse(m, "not a regular file or folder")
            if not parts:  # the archive's own `.`
                continue
            if len(parts) > 2 or (len(parts) == 2 and m.isdir()):
                self._refuse(m, "nested below the package folder")
            limit = MAX_BYTES.get(parts[-1], OTHER_MAX_BYTES)
            if m.size > limit:
                self._refuse(m, f"{m.size} bytes, more than the {limit} a {parts[-1]} may have")
            total += m.size
            if total > ARCHIVE_MAX_BYTES:
                self._refuse(m, f"past {ARCHIVE_MAX_BYTES} bytes of members, more than a package may have")
            name = "/".join(parts)
            if name in seen:  # tarfile would let the last one win
                self._refuse(m, "in the archive twice")
            seen.add(name)
            if m.isfile():
                self.members[name] = m
            tops.add(parts[0])
        if len(tops) != 1:
            raise SPJError(f"{path}: a package archive holds exactly one folder (found {sorted(tops) or 'nothing'})")
        self.top = tops.pop()

    def _refuse(self, member: tarfile.TarInfo, why: str):
        raise SPJError(f"{self.path}: refusing the archive: member {member.name!r} is {why}")

    def where(self, name: str) -> str:
        return f"{self.path}:{self.top}/{name}"

    def read(self, name: str, size: int | None) -> bytes:
        return self._member(name, size).read()

    def pin(self, graph: bytes, entry: dict) -> tuple[Path, _PinnedFolder]:
        """WEIGHTS inflated into a private folder as it is hashed: a file onnxruntime can map, never in Python."""
        folder = _PinnedFolder()
        (folder.path / MODEL).write_bytes(graph)
        member = self._member(WEIGHTS, entry["bytes"])
        try:
            with open(folder.path / WEIGHTS, "xb") as copy:
                digest = _copy_hashing(member, copy, entry["bytes"], self.where(WEIGHTS))
        except OSError as e:  # a full disk, most likely
            raise SPJError(f"{self.where(WEIGHTS)}: cannot unpack it into {folder.path} ({e.strerror})") from None
        _check_hash(self.where(WEIGHTS), digest, entry)
        return folder.path, folder

    def _member(self, name: str, size: int | None) -> BinaryIO:
        member = self.members.get(f"{self.top}/{name}")
        if member is None:
            raise SPJError(f"{self.where(name)}: missing from the package")
        _check_size(self.where(name), name, member.size, size)
        return self.tar.extractfile(member)
