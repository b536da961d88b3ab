"""Reading a package (a directory, or its .tar.gz) into memory, every file checked against spj.json first.

The files are read once, as bytes, and those very bytes are hashed and then handed to onnxruntime and tokenizers: what
was verified is what runs, whatever happens to the files afterwards. A tar is never extracted to disk: its members are
read in memory, and the whole archive is refused if any member is a link, a device, an absolute path or a path that
leaves the package folder.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import SPJError
from ..sampling import SamplingParams

MANIFEST = "spj.json"
MODEL = "model.onnx"
TOKENIZER = "tokenizer.json"
FORMAT_VERSION = 1
MANIFEST_MAX_BYTES = 1 << 20  # a real one is a few KB; a crafted archive must not make us inflate gigabytes
SAMPLING = ("temperature", "top_k", "top_p", "repetition_penalty")
# What the runtime reads from spj.json, and the least value of its integers.
INTEGERS = {
    **{("model", key): 1 for key in ("num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size",
                                     "max_position_embeddings")},
    **{("special_tokens", key): 0 for key in ("bos_token_id", "eos_token_id", "pad_token_id")},
    ("generation", "max_new_tokens"): 0, ("generation", "top_k"): 0,
}
REQUIRED = [
    *INTEGERS, *(("generation", key) for key in SAMPLING if ("generation", key) not in INTEGERS),
    ("graph",), ("opset",), ("quantization", "mode"),
    ("files", MODEL, "sha256"), ("files", TOKENIZER, "sha256"),
]


@dataclass(frozen=True)
class Package:
    source: Path
    manifest: dict
    files: dict[str, bytes]  # MODEL and TOKENIZER, verified

    @property
    def config(self) -> dict:
        return self.manifest["model"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_package(path: str | Path) -> Package:
    path = Path(path)
    if path.is_dir():
        return _read(path, _DirectoryFiles(path))
    if not path.exists():
        raise SPJError(f"{path}: no such package")
    if not tarfile.is_tarfile(path):
        raise SPJError(f"{path}: not a package (expected a directory with {MANIFEST}, or its .tar.gz)")
    try:
        with tarfile.open(path) as tar:
            return _read(path, _TarFiles(path, tar))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise SPJError(f"{path}: damaged archive ({e})") from None


def _read(source: Path, files) -> Package:
    manifest = _parse_manifest(files.read(MANIFEST, None, MANIFEST_MAX_BYTES), files.where(MANIFEST))
    verified = {}
    for name in (MODEL, TOKENIZER):
        entry = manifest["files"][name]
        data = files.read(name, entry.get("bytes"))
        if sha256(data) != entry["sha256"]:
            raise SPJError(f"{files.where(name)}: sha256 differs from {MANIFEST}'s: the file was changed or damaged "
                           "after packaging; refusing to load it")
        verified[name] = data
    return Package(source, manifest, verified)


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPJError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise SPJError(f"{where}: not a spj-edge package manifest")
    if manifest["format_version"] != FORMAT_VERSION:
        raise SPJError(f"{where}: package format version {manifest['format_version']!r}; this runtime reads version "
                       f"{FORMAT_VERSION} (update spj-edge or repackage the model)")
    missing = [".".join(path) for path in REQUIRED if not _has(manifest, path)]
    if missing:
        raise SPJError(f"{where}: incomplete manifest, it lacks {', '.join(missing)}")
    _check_values(manifest, where)
    return manifest


def _check_values(manifest: dict, where: str) -> None:
    """Values of the right kind: a damaged or hand-edited manifest fails here, naming its entry, rather than as a
    TypeError in the middle of generation."""
    for (section, key), least in INTEGERS.items():
        value = manifest[section][key]
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
            raise SPJError(f"{where}: {section}.{key} must be an integer ≥ {least}, got {value!r}")
    generation = manifest["generation"]
    for key in SAMPLING:
        if not isinstance(generation[key], (int, float)) or isinstance(generation[key], bool):
            raise SPJError(f"{where}: generation.{key} must be a number, got {generation[key]!r}")
    try:
        SamplingParams(**{key: generation[key] for key in SAMPLING})
    except SPJError as e:
        raise SPJError(f"{where}: generation defaults: {e}") from None


def _has(obj, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False
        obj = obj[key]
    return True


class _DirectoryFiles:
    def __init__(self, root: Path):
        self.root = root

    def where(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str, size: int | None, most: int | None = None) -> bytes:
        path = self.root / name
        if not path.is_file():
            raise SPJError(f"{path}: missing from the package")
        if most is not None and path.stat().st_size > most:
            raise SPJError(f"{path}: {path.stat().st_size} bytes, more than the {most} a {name} may have")
        try:
            return path.read_bytes()
        except OSError as e:  # unreadable input is bad input (exit 2), as everywhere else
            raise SPJError(f"{path}: cannot read ({e.strerror})") from None


class _TarFiles:
    """The members of a package archive: one folder holding the package files, nothing else."""

    def __init__(self, path: Path, tar: tarfile.TarFile):
        self.path, self.tar = path, tar
        members = tar.getmembers()
        tops = set()
        for m in members:
            parts = PurePosixPath(m.name).parts
            if m.name.startswith("/"):
                self._refuse(m, "an absolute path")
            if ".." in parts:
                self._refuse(m, "a path that leaves the package folder")
            if m.issym() or m.islnk():
                self._refuse(m, f"a link (to {m.linkname!r})")
            if not (m.isfile() or m.isdir()):
                self._refuse(m, "not a regular file or folder")
            if len(parts) > 2 or (len(parts) == 2 and m.isdir()):
                self._refuse(m, "nested below the package folder")
            tops.add(parts[0] if parts else "")
        if len(tops) != 1 or "" in tops:
            raise SPJError(f"{path}: a package archive holds exactly one folder (found {sorted(tops) or 'nothing'})")
        self.top = tops.pop()
        self.members = {m.name: m for m in members if m.isfile()}

    def _refuse(self, member: tarfile.TarInfo, why: str):
        raise SPJError(f"{self.path}: refusing the archive: member {member.name!r} is {why}")

    def where(self, name: str) -> str:
        return f"{self.path}:{self.top}/{name}"

    def read(self, name: str, size: int | None, most: int | None = None) -> bytes:
        member = self.members.get(f"{self.top}/{name}")
        if member is None:
            raise SPJError(f"{self.where(name)}: missing from the package")
        # Sizes are checked before reading (the manifest's, or a limit), so a crafted archive can't make us inflate a
        # huge member.
        if most is not None and member.size > most:
            raise SPJError(f"{self.where(name)}: {member.size} bytes, more than the {most} a {name} may have; "
                           "refusing to read it")
        if size is not None and member.size != size:
            raise SPJError(f"{self.where(name)}: {member.size} bytes where {MANIFEST} says {size}: the file was "
                           "changed or damaged after packaging; refusing to load it")
        return self.tar.extractfile(member).read()
