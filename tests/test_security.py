"""What a user's files can make spj-edge do: only safetensors, JSON, text and ONNX are read, never a pickle; a package
archive is read in memory and refused whole if any member could land outside its folder; and nothing is written
anywhere but the outputs the user named (and the system's temporary folder, cleaned up)."""
from __future__ import annotations

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
from spj_edge.export import export
from spj_edge.package import package
from spj_edge.runtime import Generator
from spj_edge.runtime.__main__ import main as runtime_main
from spj_edge.runtime.reader import MANIFEST_MAX_BYTES
from test_bad_inputs import build_checkpoint, check_one_line, rehash


class Payload:
    """Unpickling this creates `marker`: had any loader unpickled it, the file would exist."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    checkpoint = build_checkpoint(root / "ckpt")
    export(checkpoint, root / "onnx")
    package(root / "onnx", root / "nano.spj")
    return root


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


def test_no_code_can_unpickle():
    """The readers above are the only ones: nothing in the package calls a loader that can unpickle, nor extracts an
    archive to disk."""
    forbidden = re.compile(r"\bimport pickle\b|\bpickle\.[a-z_]|torch\.load\(|allow_pickle\s*=\s*True|"
                           r"weights_only\s*=\s*False|\bjoblib\b|\bdill\b|\.extractall\(|shutil\.unpack_archive|"
                           r"np\.load\(")
    offenders = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                 for path in sorted((REPO / "spj_edge").rglob("*.py"))
                 for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if forbidden.search(line)]
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
