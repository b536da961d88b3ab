"""What a user's files can make spj-edge do: only safetensors, JSON, text and ONNX are read, never a pickle; a package
archive is read in memory and refused whole if any member could land outside its folder; and nothing is written
anywhere but the outputs the user named (and the system's temporary folder, cleaned up)."""
from __future__ import annotations

import ast
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE
from spj_edge.cli import main as cli_main
from spj_edge.errors import EXIT_USAGE, SPJError
from spj_edge.runtime import Generator
from spj_edge.runtime.__main__ import main as runtime_main
from spj_edge.runtime.reader import MANIFEST_MAX_BYTES
from test_bad_inputs import check_one_line, rehash


class Payload:
    """Unpickling this creates `marker`: had any loader unpickled it, the file would exist."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def built(untrained):
    """ckpt, onnx and nano.spj of an untrained nano (conftest.untrained): copy what a test changes."""
    return untrained


@pytest.fixture
def pickled(tmp_path):
    """The bytes of a pickle that would create tmp_path/PWNED, and that marker's path."""
    marker = tmp_path / "PWNED"
    return pickle.dumps(Payload(marker)), marker


def checkpoint_with(built: Path, target: Path, replace: dict[str, bytes], remove=("model.safetensors",)) -> Path:
    shutil.copytree(built / "ckpt", target)
    for name in remove:
        (target / name).unlink()
    for name, data in replace.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_bytes(data)
    return target


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "weights.pkl", "last.ckpt"])
@pytest.mark.parametrize("verb", ["generate", "export", "prune", "distill"])
def test_pickled_weights_are_refused_by_name_and_never_unpickled(built, pickled, tmp_path, capsys, name, verb):
    data, marker = pickled
    model = checkpoint_with(built, tmp_path / "ckpt", {name: data})
    argv = {"generate": ["generate", "--model", model, "--prompt", "Hi"],
            "export": ["export", "--model", model, "--out", tmp_path / "out"],
            "prune": ["prune", "--model", model, "--ffn-ratio", "0.5", "--importance", "l1", "--out", tmp_path / "out"],
            "distill": ["distill", "--teacher", model, "--preset", "nano", "--data", SHAKESPEARE / "val.txt",
                        "--out", tmp_path / "out"]}[verb]
    code = cli_main(list(map(str, argv)))
    check_one_line(capsys.readouterr().err, code, EXIT_USAGE,
                   [f"{model}: no model.safetensors", name, "pickles, which are never loaded"])
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["weights", "optimizer-state", "tokenizer", "preset", "calibration-text",
                                   "onnx-to-quantize", "onnx-to-package", "package"])
def test_a_pickle_under_any_expected_name_is_refused_without_running(built, pickled, tmp_path, capsys, where):
    """A pickle renamed to what spj-edge does read: each reader parses its own format, which a pickle is not."""
    data, marker = pickled
    text, out, runtime = SHAKESPEARE / "val.txt", tmp_path / "out", False
    if where == "weights":
        model = checkpoint_with(built, tmp_path / "ckpt", {"model.safetensors": data})
        argv, fragment = ["generate", "--model", model, "--prompt", "Hi"], "model.safetensors: corrupt or truncated"
    elif where == "optimizer-state":  # --resume reads the optimizer moments from the checkpoint being continued
        argv = ["train", "--preset", "nano", "--data", text, "--tokenizer", built / "ckpt" / "tokenizer.json",
                "--steps", "1", "--batch-size", "2", "--eval-windows", "2", "--out", tmp_path / "run"]
        assert cli_main(list(map(str, argv))) == 0
        (tmp_path / "run" / "train_state" / "optimizer.safetensors").write_bytes(data)
        capsys.readouterr()
        argv += ["--resume"]
        fragment = "optimizer.safetensors: corrupt"
    elif where == "tokenizer":
        (tmp_path / "tokenizer.pkl").write_bytes(data)
        argv = ["train", "--preset", "nano", "--data", text, "--tokenizer", tmp_path / "tokenizer.pkl", "--out", out]
        fragment = "tokenizer.pkl: not a valid tokenizer.json"
    elif where == "preset":
        (tmp_path / "preset.json").write_bytes(data)
        argv = ["train", "--preset", tmp_path / "preset.json", "--data", text, "--out", out]
        fragment = "preset.json: not valid JSON"
    elif where == "calibration-text":
        (tmp_path / "calib.txt").write_bytes(data)
        argv = ["quantize", "--model", built / "onnx", "--calib", tmp_path / "calib.txt", "--out", out]
        fragment = "calib.txt: binary file"
    elif where in ("onnx-to-quantize", "onnx-to-package"):
        shutil.copytree(built / "onnx", tmp_path / "onnx")
        (tmp_path / "onnx" / "model.onnx").write_bytes(data)
        verb = where.removeprefix("onnx-to-")
        argv = [verb, "--model", tmp_path / "onnx", "--out", out] + (["--calib", text] if verb == "quantize" else [])
        fragment = "model.onnx: not a valid ONNX model"
    else:
        shutil.copytree(built / "nano.spj", tmp_path / "nano.spj")
        (tmp_path / "nano.spj" / "model.onnx").write_bytes(data)
        rehash(tmp_path / "nano.spj")
        argv, runtime = ["--model", tmp_path / "nano.spj", "--prompt", "Hi"], True
        fragment = "model.onnx: not a valid ONNX model"  # refused by the runtime's own check, before onnxruntime
    code = (runtime_main if runtime else cli_main)(list(map(str, argv)))
    check_one_line(capsys.readouterr().err, code, EXIT_USAGE, [fragment])
    assert not marker.exists()
    assert not out.exists()


# Modules whose loading can unpickle (or, for marshal, load code), and names that load a pickle when imported alone.
UNPICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
UNPICKLING_NAMES = {("torch", "load"), ("numpy", "load"), ("pandas", "read_pickle"), ("shutil", "unpack_archive")}
UNPICKLING_CALLS = re.compile(r"\bpickle\.[a-z_]|torch\.load\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                              r"\.extractall\(|shutil\.unpack_archive|\b(np|numpy)\.load\(|read_pickle\(")


def unpickling_uses(source: str) -> list[str]:
    """Each line of `source` that imports a module that can unpickle, however the import is written (`import pickle
    as p`, `import os, pickle`, `from pickle import loads`, `__import__("pickle")`, `importlib.import_module(...)`),
    or calls a loader that can unpickle, or extracts an archive to disk."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            names = [node.args[0].value]
        for name in names:
            top, _, rest = name.partition(".")
            if top in UNPICKLING_MODULES or (top, rest) in UNPICKLING_NAMES:
                found[node.lineno] = name
    lines = source.splitlines()
    found.update({number: "call" for number, line in enumerate(lines, 1) if UNPICKLING_CALLS.search(line)})
    return [f"{number}: {lines[number - 1].strip()}" for number in sorted(found)]


@pytest.mark.parametrize("source", [
    "import pickle", "import pickle as p", "import os, pickle", "import os.path, _pickle as fast",
    "from pickle import loads", "from pickle import loads as read", "from pickle import (\n    loads,\n)",
    "from _pickle import Unpickler", "import dill", "from joblib import load", "import shelve", "import marshal",
    "import cloudpickle", "__import__('pickle')", "importlib.import_module('pickle')", "from torch import load",
    "from numpy import load", "from shutil import unpack_archive", "torch.load(path)", "state = torch.load(path)",
    "np.load(path, allow_pickle=True)", "numpy.load(path)", "pd.read_pickle(path)", "tar.extractall(folder)",
    "shutil.unpack_archive(path, folder)", "torch.load(path, weights_only=False)", "x = pickle.loads(data)",
])
def test_the_scan_catches_each_way_of_writing_it(source):
    assert unpickling_uses(source), source


def test_the_scan_lets_safe_readers_through():
    safe = ("import json\nimport tarfile\nfrom safetensors.torch import load_file, save_file\nimport numpy as np\n"
            "from onnx import load as load_onnx\nweights = load_file(path)\nproto = onnx.load(path)\n"
            "data = json.loads(text)\nmember = tar.extractfile(info)\n")
    assert unpickling_uses(safe) == []


def test_no_code_can_unpickle():
    """The readers above are the only ones: nothing in the package imports or calls a loader that can unpickle, nor
    extracts an archive to disk."""
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in sorted((REPO / "spj_edge").rglob("*.py"))
                 for line in unpickling_uses(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders


# --- archives: test_runtime refuses ../, absolute paths, symlinks, hardlinks and devices; these are the rest ---------
def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data)
    return info, io.BytesIO(data)


def archive(built: Path, path: Path, extra: list[tuple] = (), top: str = "nano.spj", skip=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in ("spj.json", "tokenizer.json", "model.onnx"):
            if name not in skip:
                tar.add(built / "nano.spj" / name, arcname=f"{top}/{name}")
        for info, data in extra:
            tar.addfile(info, data)
    return path


@pytest.mark.parametrize("case, extra, skip, why", [
    ("nested", [member("nano.spj/sub/model.onnx", b"x")], (), "member 'nano.spj/sub/model.onnx' is nested below"),
    ("fifo", [member("nano.spj/pipe", kind=tarfile.FIFOTYPE)], (), "member 'nano.spj/pipe' is not a regular file"),
    ("dot-dot-inside", [member("nano.spj/a/../../evil", b"x")], (), "a path that leaves the package folder"),
    ("second-folder", [member("other/model.onnx", b"x")], (), "holds exactly one folder (found ['nano.spj', 'other'])"),
    ("loose-file", [member("README", b"x")], (), "holds exactly one folder"),
    # 2 MiB of zeros: a few KB compressed, the size a decompression bomb claims
    ("huge-manifest", [member("nano.spj/spj.json", bytes(2 * MANIFEST_MAX_BYTES))], ("spj.json",),
     f"{2 * MANIFEST_MAX_BYTES} bytes, more than the {MANIFEST_MAX_BYTES} a spj.json may have"),
])
def test_more_unsafe_archives_are_refused(built, tmp_path, case, extra, skip, why):
    path = archive(built, tmp_path / f"{case}.tar.gz", extra, skip=skip)
    with pytest.raises(SPJError, match=re.escape(why)):
        Generator.load(path)


def test_a_huge_manifest_in_a_directory_is_refused(built, tmp_path):
    shutil.copytree(built / "nano.spj", tmp_path / "nano.spj")
    with open(tmp_path / "nano.spj" / "spj.json", "ab") as f:
        f.write(b" " * MANIFEST_MAX_BYTES)
    with pytest.raises(SPJError, match="spj.json: .* bytes, more than the 1048576 a spj.json may have"):
        Generator.load(tmp_path / "nano.spj")


# --- nothing is written outside the paths given --------------------------------------------------------------------
EVERY_VERB = """
import sys
from spj_edge.cli import main
from spj_edge.runtime.__main__ import main as runtime

ckpt, text, out = sys.argv[1:4]
tokenizer = f"{ckpt}/tokenizer.json"
steps = ["--steps", "2", "--batch-size", "2", "--eval-every", "2", "--eval-windows", "2"]
runs = [
    main(["tokenizer", "--data", text, "--vocab-size", "300", "--out", f"{out}/tokenizer.json"]),
    main(["train", "--preset", "nano", "--data", text, "--tokenizer", tokenizer, *steps, "--out", f"{out}/train"]),
    main(["distill", "--teacher", ckpt, "--preset", "nano", "--data", text, *steps, "--out", f"{out}/distill"]),
    main(["prune", "--model", ckpt, "--ffn-ratio", "0.5", "--importance", "l1", "--out", f"{out}/pruned"]),
    main(["generate", "--model", ckpt, "--prompt", "Hi", "--max-new-tokens", "4"]),
    main(["export", "--model", ckpt, "--out", f"{out}/onnx"]),
    # an untrained model may fail the gate: --force writes it anyway; what is written where is the point here
    main(["quantize", "--model", f"{out}/onnx", "--calib", text, "--calib-samples", "4", "--force",
          "--out", f"{out}/int8"]),
    main(["package", "--model", f"{out}/int8", "--tar", "--out", f"{out}/nano.spj"]),
    runtime(["--model", f"{out}/nano.spj.tar.gz", "--prompt", "Hi", "--max-new-tokens", "4"]),
]
sys.exit(max(runs))
"""


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.slow  # every stage end to end in one process, as the demo is
def test_every_verb_writes_only_its_output(built, tmp_path):
    """In a fresh process whose working directory, HOME and TMPDIR are empty folders of their own: afterwards they
    are still empty, the inputs are unchanged, and the output folder holds the outputs and nothing else."""
    inputs = tmp_path / "inputs"
    shutil.copytree(built / "ckpt", inputs / "ckpt")
    shutil.copy(SHAKESPEARE / "val.txt", inputs / "text.txt")
    work, home, tmp, out = (tmp_path / name for name in ("work", "home", "tmp", "out"))
    for folder in (work, home, tmp, out):
        folder.mkdir()
    before = listing(inputs)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp), "PYTHONPATH": str(REPO),
           "PYTHONDONTWRITEBYTECODE": "1", "XDG_CACHE_HOME": "", "XDG_CONFIG_HOME": ""}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(EVERY_VERB), inputs / "ckpt", inputs / "text.txt",
                             out], capture_output=True, text=True, timeout=600, cwd=work, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (listing(work), listing(home), listing(tmp)) == ({}, {}, {})
    assert listing(inputs) == before
    assert sorted(p.name for p in out.iterdir()) == ["distill", "int8", "nano.spj.tar.gz", "onnx", "pruned",
                                                      "tokenizer.json", "tokenizer.report.json", "train"]
