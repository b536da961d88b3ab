"""`pip install .` (the device runtime alone) still gives a working `spj-edge --help`, and every verb that needs the
toolchain says in one line which extra to install."""
import subprocess
import sys

import pytest

from conftest import REPO, SHAKESPEARE, assert_one_line_error

# What the base install leaves out (tqdm does come: tokenizers needs huggingface_hub, which needs tqdm).
ABSENT = ("torch", "transformers", "onnx", "onnx_ir", "safetensors", "rich", "sacrebleu", "rouge_score", "nltk",
          "matplotlib", "zstandard", "pyarrow", "fastokens")
# Absent as an uninstalled package is: a ModuleNotFoundError naming it, at import.
ABSENT_SITE = f"""
import sys

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {ABSENT!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
"""


def spj_edge(tmp_path, *args):
    (tmp_path / "sitecustomize.py").write_text(ABSENT_SITE)
    return subprocess.run([sys.executable, "-m", "spj_edge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"})


def test_the_blocker_blocks(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(ABSENT_SITE)
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in result.stderr


def test_help_works_without_the_toolchain(tmp_path):
    result = spj_edge(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for verb in ("tokenizer", "train", "distill", "prune", "export", "quantize", "package", "eval", "bench", "demo"):
        assert verb in result.stdout
    train_help = spj_edge(tmp_path, "train", "--help")
    assert train_help.returncode == 0 and "--grad-accum" in train_help.stdout, train_help.stderr


@pytest.mark.parametrize("args", [
    ["train", "--preset", "nano", "--data", SHAKESPEARE / "val.txt", "--steps", "1"],
    ["export", "--model", "runs/x"],
    ["quantize", "--model", "runs/x"],
    ["generate", "--model", "runs/x", "--prompt", "Hi"],
    ["demo", "--quick"],
    ["prepare", "--data", SHAKESPEARE / "val.txt", "--tokenizer", "tokenizer.json", "--out", "shards"],
])
def test_a_verb_that_needs_the_toolchain_names_the_extra(tmp_path, args):
    result = spj_edge(tmp_path, *args)
    assert_one_line_error(result, "the runtime-only install leaves out", "pip install 'spj-edge[toolchain]'")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["sitecustomize.py"], \
        "nothing written"
