"""Weights as ONNX external data (model.onnx.data) through every stage, forced on nano: what a graph past protobuf's
2 GiB gets by default. Each stage's output computes what the same stage's inline output computes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from conftest import SHAKESPEARE, UD, cli
from spj_edge.runtime import Generator

CALIB = [UD / "en_ewt_dev.txt", SHAKESPEARE / "val.txt"]
PROMPT, TOKENS = "First Citizen:\nBefore we", 24


@pytest.fixture(scope="module")
def external(nano_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    assert cli("export", "--model", nano_checkpoint, "--out", root / "onnx", "--external-data").returncode == 0
    return root


def graph_files(directory) -> list[str]:
    return sorted(p.name for p in directory.glob("model.onnx*"))


def test_export_keeps_the_weights_beside_the_graph(external, nano_export):
    out = external / "onnx"
    assert graph_files(out) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    report = json.loads((out / "report.json").read_text())
    assert report["external_data"] and report["checks"]["greedy_identical"]
    graph_only = onnx.load(out / "model.onnx", load_external_data=False)
    assert (out / "model.onnx").stat().st_size < 0.1 * (out / "model.onnx.data").stat().st_size
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_only.graph.initializer
               if np.prod(t.dims) * 4 >= 1024)  # every tensor of 1 KiB or more went out
    inline = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(nano_export / "model.onnx").graph.initializer}
    beside = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out / "model.onnx").graph.initializer}
    assert inline.keys() == beside.keys() and all(np.array_equal(inline[k], beside[k]) for k in inline)


@pytest.mark.parametrize("mode", ["dynamic", "int4"])
def test_quantize_reads_and_writes_external_data(external, mode):
    out = external / mode
    result = cli("quantize", "--model", external / "onnx", "--out", out, "--mode", mode, "--calib", *CALIB,
                 "--external-data", "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert graph_files(out) == ["model.onnx", "model.onnx.data"]
    assert json.loads((out / "report.json").read_text())["mode"] == mode


@pytest.mark.parametrize("source", ["onnx", "dynamic"])
def test_a_package_of_an_external_export_runs_as_the_inline_one(external, nano_package, source):
    if source == "dynamic" and not (external / "dynamic").is_dir():
        cli("quantize", "--model", external / "onnx", "--out", external / "dynamic", "--mode", "dynamic", "--calib",
            *CALIB, "--external-data", "--force")
    out = external / f"{source}.spj"
    assert cli("package", "--model", external / source, "--out", out).returncode == 0
    assert cli("package", "--model", external / source, "--out", out, "--tar").returncode == 0
    # the weights file is copied as it is, never parsed (only the graph gains the last-position Gather)
    assert (out / "model.onnx.data").read_bytes() == (external / source / "model.onnx.data").read_bytes()
    options = dict(max_new_tokens=TOKENS, temperature=0, ignore_eos=True)
    tokens = list(Generator.load(out).tokens(PROMPT, **options))
    assert list(Generator.load(out.with_name(f"{out.name}.tar.gz")).tokens(PROMPT, **options)) == tokens
    if source == "onnx":  # the same float weights as nano_package, kept inline until packaging
        assert list(Generator.load(nano_package).tokens(PROMPT, **options)) == tokens


def test_eval_reads_an_external_export(external, nano_export):
    result = cli("eval", "--model", external / "onnx", "--baseline", nano_export, "--data", SHAKESPEARE / "val.txt",
                 "--json", external / "eval.json")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((external / "eval.json").read_text())
    assert figures["files"][str(SHAKESPEARE / "val.txt")]["top1_agreement"] == 1.0  # the same weights
    sizes = figures["model"]["file_bytes"], figures["baseline"]["file_bytes"]
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[1]  # the weights file counts in the model's size
