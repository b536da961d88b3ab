"""The README runs as written: its shell and Python blocks, in order, on a fresh copy of the repository whose `.venv`
is the one `make test` made (the set-up block itself, a bare ``` block, is what CI has just run)."""
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow

BLOCK = re.compile(r"^```(sh|python)\n(.*?)^```$", re.M | re.S)
MARK = "@@ block {}"


def readme_script() -> tuple[str, list[tuple[str, str]]]:
    """One bash script that runs every block in order and prints MARK before each, and the blocks themselves."""
    blocks = BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8"))
    lines = ["set -euo pipefail"]
    for i, (language, body) in enumerate(blocks):
        lines.append(f"echo '{MARK.format(i)}'")
        lines.append(body if language == "sh" else f"python - <<'PYTHON'\n{body}PYTHON")
    return "\n".join(lines) + "\n", blocks


def fresh_copy(tmp_path):
    """The repository's tracked files (what a clone holds) beside ../shared, with the tested .venv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    copy = tmp_path / "main"
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    (copy / ".venv").symlink_to(REPO / ".venv")
    (tmp_path / "shared").symlink_to(SHARED_DATA.parent)
    return copy


def test_every_readme_block_runs_in_order_on_a_fresh_copy(tmp_path):
    assert (REPO / ".venv" / "bin" / "activate").is_file(), "run through `make test-slow`, which makes .venv"
    script, blocks = readme_script()
    assert [language for language, _ in blocks].count("sh") >= 2 and len(blocks) >= 4, blocks
    copy = fresh_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(str(REPO / ".venv")))  # the README's activate must do it
    result = subprocess.run(["bash", "-c", script], cwd=copy, capture_output=True, text=True, env=env, timeout=3600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    outputs = dict(zip(range(len(blocks)), re.split(r"^@@ block \d+\n", result.stdout, flags=re.M)[1:]))
    device = [i for i, (_, body) in enumerate(blocks) if "spj_edge.runtime" in body]
    assert len(device) == 2, "the device's shell block and its Python block"
    for i in device:  # what the model says is shown: words, not a lone "." (the README's examples once were)
        plain = [line for line in outputs[i].splitlines() if not line.startswith("{")]
        assert len(re.sub(r"\W", "", "".join(plain))) >= 20, (blocks[i], outputs[i])
    replies = [json.loads(line) for line in outputs[device[0]].splitlines() if line.startswith("{")]
    assert [r["line"] for r in replies] == [1, 2], "one JSON reply per stdin line"
    assert all(len(re.sub(r"\W", "", r["text"])) >= 10 for r in replies), replies
    for produced in ("runs/teacher/model.safetensors", "runs/onnx/model.onnx", "runs/int8/report.json",
                     "dist/student-int8.spj/spj.json", "dist/student-int8.spj.tar.gz", "runs/eval.json",
                     "runs/bench.png", "runs/nano/model.safetensors", "runs/student-ddp/report.json"):
        assert (copy / produced).is_file(), produced
