"""The device runtime holds one copy of the model: its resident set after loading a `small`-sized package is at most
1.15 × the model's bytes + 60 MB (benchmarks/runtime_memory.py measures it in a fresh interpreter), for float32,
int8 and int4 packages, as a directory and as a .tar.gz. Before the weights moved to model.onnx.data, the float32
package took 540 MB for a 215 MB model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHAKESPEARE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> list:
    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.config import load_preset
    from spj_edge.export import export
    from spj_edge.model import Transformer
    from spj_edge.options import PackageOptions, QuantizeOptions
    from spj_edge.package import package
    from spj_edge.quantize import quantize
    from spj_edge.tokenizer import special_token_ids, train_tokenizer

    root = tmp_path_factory.mktemp("small")
    tokenizer = train_tokenizer([SHAKESPEARE.joinpath("val.txt").read_text(encoding="utf-8")], 512)
    config = load_preset("small").replace(**special_token_ids(tokenizer))  # its 32,000 ids, as benchmarks use it
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", Transformer(config), tokenizer, {"stage": "train"})
    export(root / "ckpt", root / "fp32")
    text = [SHAKESPEARE / "val.txt"]
    gate = dict(force=True, eval_windows=2, measure=False, calib_samples=2)  # random weights: the gate is not the point
    quantize(root / "fp32", root / "int8", calib=text, options=QuantizeOptions(mode="dynamic", **gate))
    quantize(root / "fp32", root / "int4", calib=text, options=QuantizeOptions(mode="int4", **gate))
    built = []
    for kind in ("fp32", "int8", "int4"):
        package(root / kind, root / f"{kind}.spj")
        package(root / kind, root / f"{kind}.spj", PackageOptions(tar=True))
        built += [root / f"{kind}.spj", root / f"{kind}.spj.tar.gz"]
    return built


def test_the_runtime_holds_one_copy_of_the_model(packages, tmp_path):
    figures = tmp_path / "memory.json"
    subprocess.run([sys.executable, REPO / "benchmarks" / "runtime_memory.py", *packages, "--json", figures],
                   check=True, cwd=REPO)
    rows = json.loads(figures.read_text())
    assert len(rows) == 6
    for row in rows:
        assert row["rss_after_load_mb"] <= row["bound_mb"], row
    fp32 = rows[0]
    assert fp32["model_mb"] > 100  # `small` float32: the bound is about the weights, not the interpreter
