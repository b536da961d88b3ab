"""Weights block-quantized already (a GGUF's) are found on their grid and written as MatMulNBits without a second
rounding: the grids of gguf's own quantizer and a K-quant-like one are recovered, float weights are on none, the
written graph computes the grid's weights, and (slow) int4 of an imported GGUF keeps them (weight_grids.py)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType, quants
from onnx import TensorProto, helper, numpy_helper

from conftest import SHARED_DATA, cli
from spj_edge import weight_grids
from spj_edge.import_gguf import import_gguf
from test_import_gguf import write_tiny_gguf

EPS = np.finfo(np.float32).eps
K, N = 128, 24


def gguf_rounded(qtype: str, seed: int = 0) -> np.ndarray:
    """A [K, N] MatMul weight (x @ w) as a GGUF holds it: [N, K] rows quantized in blocks along K, dequantized."""
    w = np.random.default_rng(seed).normal(0, 0.25, (N, K)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    return quants.dequantize(quants.quantize(w, kind), kind).T.copy()


def k_quant_like(seed: int = 0) -> np.ndarray:
    """Blocks of 32 with a step and minimum each whose codes stay within 2..13: what Q4_K's fitted sub-block minimum
    gives, which gguf cannot write (its Q4_K has no quantizer)."""
    rng = np.random.default_rng(seed)
    blocks = K // weight_grids.BLOCK
    step = rng.uniform(0.01, 0.05, (N, blocks, 1)).astype(np.float16).astype(np.float32)
    origin = -rng.uniform(0.1, 0.4, (N, blocks, 1)).astype(np.float16).astype(np.float32)
    codes = rng.integers(2, 14, (N, blocks, weight_grids.BLOCK)).astype(np.float32)
    return (origin + step * codes).reshape(N, K).T.copy()


def reconstruction_bound(w: np.ndarray) -> float:
    """How far a weight found on a grid may be from it (weight_grids' acceptance: ON_GRID of a step, which is at most
    2·max|w| / 15, plus ROUNDING of max|w|), and float32's three roundings of step · (code - 8) + offset."""
    largest = float(np.abs(w).max())
    return weight_grids.ON_GRID * 2 * largest / 15 + weight_grids.ROUNDING * largest + 8 * EPS * largest


@pytest.mark.parametrize("qtype, bits, offsets", [("Q4_0", 4, False), ("Q4_1", 4, True), ("Q8_0", 8, False)])
def test_ggufs_own_grids_are_found_and_kept(qtype, bits, offsets):
    w = gguf_rounded(qtype)
    grid = weight_grids.find(w)
    assert grid is not None and grid.bits == bits and (grid.offsets is not None) == offsets
    assert np.abs(grid.dequantized() - w).max() <= reconstruction_bound(w)


def test_a_k_quant_sub_block_is_found_by_its_smallest_gap():
    w = k_quant_like()
    grid = weight_grids.find(w)
    assert grid is not None and grid.bits == 4 and grid.offsets is not None
    assert np.abs(grid.dequantized() - w).max() <= reconstruction_bound(w)


@pytest.mark.parametrize("rounding", ["float32", "float16", "Q5_0"])
def test_other_weights_are_on_no_grid(rounding):
    """Float weights, float16-rounded ones, and a 5-bit GGUF grid (which 4 bits cannot hold and 8 do not fit)."""
    if rounding == "Q5_0":
        w = gguf_rounded("Q5_0")
    else:
        w = np.random.default_rng(1).normal(0, 0.25, (K, N)).astype(rounding).astype(np.float32)
    assert weight_grids.find(w) is None
    assert weight_grids.find(w[:-1]) is None  # K not a multiple of the block


def one_matmul(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "/proj/weight"], ["y"], name="/proj/MatMul")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "sequence", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "sequence", N])],
        [numpy_helper.from_array(w, "/proj/weight")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "K-quant"])
def test_the_written_graph_computes_the_grids_weights(qtype):
    """MatMulNBits (accuracy level 0: float arithmetic) plus the block-sum correction against x @ w in float64. The
    bound is float32 summation's, per output: (terms + 2) · eps times the sum of the magnitudes of every product
    summed, the correction's included (x's block sums times the offsets)."""
    w = k_quant_like() if qtype == "K-quant" else gguf_rounded(qtype)
    grid = weight_grids.find(w)
    proto = one_matmul(w)
    weight_grids.write(proto, ["/proj/MatMul"], accuracy_level=0)
    assert [n.op_type for n in proto.graph.node] == (
        ["MatMulNBits"] if grid.offsets is None else ["MatMulNBits", "Reshape", "ReduceSum", "MatMul", "Add"])
    assert "/proj/weight" not in {i.name for i in proto.graph.initializer}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(0, 1, (1, 5, K)).astype(np.float32)
    produced = session.run(None, {"x": x})[0]
    expected = x.astype(np.float64) @ w.astype(np.float64)
    blocks = K // weight_grids.BLOCK
    middle = 1 << (grid.bits - 1)
    centred = (grid.steps[..., None] * (grid.codes.astype(np.float64) - middle)).reshape(N, K).T
    magnitude = np.abs(x) @ np.abs(centred)
    if grid.offsets is not None:
        block_sums = np.abs(x).reshape(1, 5, blocks, weight_grids.BLOCK).sum(-1)
        magnitude += block_sums @ np.abs(grid.offsets.T) + np.abs(x) @ np.abs(w)
    bound = (K + blocks + 2) * EPS * magnitude + reconstruction_bound(w) * np.abs(x).sum(-1, keepdims=True)
    assert np.all(np.abs(produced - expected) <= bound)


def run(*args) -> None:
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # import, export, quantize and package of a 49,152-token vocabulary: 40 s of the fast tier's budget
def test_int4_of_an_imported_gguf_keeps_its_grids_and_packages(tmp_path):
    """The tiny GGUF with a Q4_1 embedding (so the tied LM head needs the block-sum correction, which the package's
    last-position slice must feed too): its Q4_1 and Q8_0 MatMuls keep their grid exactly; F16 ones (fused with
    others into q/k/v and gate/up) are rounded as before; the package's greedy check passes."""
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, tensor_types={"token_embd": "Q4_1"})
    import_gguf(gguf, tmp_path / "ckpt")
    run("export", "--model", tmp_path / "ckpt", "--out", tmp_path / "onnx")
    ud = SHARED_DATA / "corpus" / "ud"
    kept = "/layers.0/mlp/down_proj/MatMul"  # on a grid, but kept in float when asked: not reported on it
    run("quantize", "--model", tmp_path / "onnx", "--out", tmp_path / "int4", "--mode", "int4", "--force",
        "--calib", ud / "en_ewt_dev.txt", "--eval", ud / "en_ewt_test.txt", "--exclude", kept)
    report = json.loads((tmp_path / "int4" / "report.json").read_text())
    assert report["on_grid"] == {"/layers.0/self_attn/o_proj/MatMul": 4, "/layers.1/self_attn/o_proj/MatMul": 4,
                                 "/layers.1/mlp/down_proj/MatMul": 8, "/lm_head/MatMul": 4}
    assert kept in report["excluded"] and kept in report["executed"]["float_weight_matmuls"]

    float_weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.initializer}
    float_graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    quantized = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    arrays = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    for name, bits in report["on_grid"].items():
        weight = float_weights[next(n for n in float_graph.node if n.name == name).input[1]]
        scope = name.rsplit("/", 1)[0]
        node = next(n for n in quantized.graph.node if n.name == f"{scope}/MatMulNBits")
        packed, steps = arrays[node.input[1]], arrays[node.input[2]]
        codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1)
        held = steps.reshape(codes.shape[:2])[..., None] * (codes.astype(np.float32) - (1 << (bits - 1)))
        offsets = arrays.get(f"{node.input[1].rsplit('.', 1)[0]}.offsets")
        if offsets is not None:
            held += offsets.T[..., None]
        assert np.abs(held.reshape(held.shape[0], -1).T - weight).max() <= reconstruction_bound(weight), name

    run("package", "--model", tmp_path / "int4", "--out", tmp_path / "int4.spj")
    manifest = json.loads((tmp_path / "int4.spj" / "spj.json").read_text())
    assert manifest["logits"] == "last" and manifest["checks"]["package"]["greedy_identical"]
