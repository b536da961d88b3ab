"""The ONNX stages (quantize, package, and eval and bench of an export or a package) never import torch: they read
their inputs through spj_edge.artifact, so a machine that only quantizes and measures needs no PyTorch."""
import json

from conftest import SHAKESPEARE, UD, run_cli

TORCH_SIDE = ("torch", "transformers", "safetensors")
BLOCKER = f"""
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {TORCH_SIDE!r}:
            raise ImportError(f"{{name}} is blocked: the ONNX stages must not import it")

sys.meta_path.insert(0, Blocker())
"""


def test_quantize_package_eval_and_bench_run_with_torch_blocked(nano_export, nano_package, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(tmp_path)}  # bench's spawned workers inherit it too
    blocked = run_cli("export", "--model", "anything", env=env)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr

    export = nano_export
    steps = [
        ["quantize", "--model", export, "--mode", "dynamic", "--calib", UD / "en_ewt_dev.txt", "--force",
         "--out", tmp_path / "int8"],
        ["package", "--model", tmp_path / "int8", "--out", tmp_path / "int8.spj", "--tar"],
        ["eval", "--model", export, "--baseline", tmp_path / "int8.spj.tar.gz", "--data", SHAKESPEARE / "val.txt",
         "--windows", "2", "--prompts", "1", "--new-tokens", "4", "--json", tmp_path / "eval.json"],
        ["bench", "--model", export, nano_package, "--prompt-tokens", "4", "--new-tokens", "4", "--repetitions", "1",
         "--threads", "1", "--json", tmp_path / "bench.json"],
    ]
    for step in steps:
        result = run_cli(*step, env=env)
        assert result.returncode == 0, (step[0], result.stderr[-2000:])
    assert json.loads((tmp_path / "eval.json").read_text())["baseline"]["kind"] == "package"
    rows = json.loads((tmp_path / "bench.json").read_text())["models"].values()
    assert [row["torch_imported"] for row in rows] == [False, False]
