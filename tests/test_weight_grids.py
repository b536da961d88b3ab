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
from spj_edge.options import QuantizeOptions
from spj_edge.quantize import Recipe, in_column_parts, kept_grids
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


def held_weights(node: onnx.NodeProto, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The [K', N] weights (float64) a written MatMulNBits holds: step · (code − zero point) per block, the zero
    point 2^(bits-1) without its zero-point input."""
    attributes = {a.name: a.i for a in node.attribute}
    bits, k, n = attributes["bits"], attributes["K"], attributes["N"]
    packed, steps = arrays[node.input[1]], arrays[node.input[2]]
    codes = packed if bits == 8 else np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:2], -1)
    blocks = codes.shape[1]
    if len(node.input) > 3:
        zeros = np.stack([arrays[node.input[3]] & 15, arrays[node.input[3]] >> 4], -1).reshape(n, -1)[:, :blocks]
    else:
        zeros = np.full((n, blocks), 1 << (bits - 1))
    held = steps.reshape(n, blocks)[..., None].astype(np.float64) * (codes - zeros[..., None].astype(np.float64))
    return held.reshape(n, -1).T[:k]


def effective_weights(held: np.ndarray, k: int) -> np.ndarray:
    """What multiplies each of x's k inputs: its own weight, plus its block's sum's where the input has them appended."""
    weights = held[:k].copy()
    if len(held) > k:
        weights += np.repeat(held[k:], weight_grids.BLOCK, axis=0)[:k]
    return weights


def with_block_sums(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x, x.reshape(*x.shape[:-1], -1, weight_grids.BLOCK).sum(-1)], -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "K-quant"])
def test_the_written_graph_computes_the_grids_weights(qtype):
    """The weights written reproduce the grid's: exactly (to its acceptance and float32's rounding) without offsets;
    with them (Q4_1, K-quants) to within half a step of each residual's 4-bit rounding, which is at most 1/14 of the
    largest of the 32 residuals it shares a scale with (1/28 of a step for Q4_1, whose residuals are half a step). The graph computes [x, x's block sums] @ those weights
    (accuracy level 0: float arithmetic) to float32 summation's bound, per output: (terms + 2) · eps times the sum of
    the magnitudes of the products, the block sums' own summation (32 terms) included."""
    w = k_quant_like() if qtype == "K-quant" else gguf_rounded(qtype)
    grid = weight_grids.find(w)
    proto = one_matmul(w)
    weight_grids.write(proto, ["/proj/MatMul"], accuracy_level=0)
    assert [n.op_type for n in proto.graph.node] == (
        ["MatMulNBits"] if grid.offsets is None else ["Reshape", "ReduceSum", "Concat", "MatMulNBits"])
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert "/proj/weight" not in arrays
    held = held_weights(proto.graph.node[-1], arrays)
    blocks = K // weight_grids.BLOCK
    residual_error = 0.0
    if grid.offsets is not None:
        assert held.shape == (K + blocks, N)
        residual_scales = arrays["/proj/weight.steps"].reshape(N, -1)[:, blocks:]  # one per 32 residuals
        residual_error = np.abs(np.repeat(residual_scales.T, weight_grids.BLOCK * weight_grids.BLOCK, axis=0)[:K]) / 2
        largest_residuals = np.abs(held[K:]).max(0)
        assert np.all(residual_error <= largest_residuals / 14 * (1 + 1e-6))
        if qtype == "Q4_1":  # every block's range holds 0 (its minimum at code 0): residuals within half a step
            assert np.all(largest_residuals <= np.abs(grid.steps).max(1) / 2 * (1 + 1e-6))
    assert np.all(np.abs(effective_weights(held, K) - w) <= reconstruction_bound(w) + residual_error)

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(0, 1, (1, 5, K)).astype(np.float32)
    produced = session.run(None, {"x": x})[0]
    inputs = with_block_sums(x.astype(np.float64)) if grid.offsets is not None else x.astype(np.float64)
    magnitude = (with_block_sums(np.abs(x)) if grid.offsets is not None else np.abs(x)) @ np.abs(held)
    bound = (len(held) + weight_grids.BLOCK + 2) * EPS * magnitude
    assert np.all(np.abs(produced - inputs @ held) <= bound)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_a_wide_weight_in_column_parts_computes_what_it_did(qtype):
    """quantize.in_column_parts: a MatMulNBits weight over the limit becomes MatMulNBits over parts of its columns, each
    within the limit, joined in order by a Concat; the parts hold exactly the whole's weights (with Q4_1's zero points
    and block sums), and compute its output at accuracy level 4 (what int4 ships: x rounded to int8 per block, the same
    for every column) to float32's bound for summing the blocks' products in another order: 2 · (blocks + 1) · eps
    times the sum of their magnitudes, |x| plus half an int8 step of its block's largest, times |w|."""
    whole = one_matmul(gguf_rounded(qtype))
    weight_grids.write(whole, ["/proj/MatMul"], accuracy_level=4)
    parted = onnx.ModelProto.FromString(whole.SerializeToString())
    weight = next(i for i in whole.graph.initializer if i.name.endswith((".q4", ".q8")))
    widest = int(np.prod(weight.dims)) // 3 + 1
    in_column_parts(parted, widest)

    matmuls = [n for n in parted.graph.node if n.op_type == "MatMulNBits"]
    assert len(matmuls) == 3 and parted.graph.node[-1].op_type == "Concat"
    assert list(parted.graph.node[-1].input) == [m.output[0] for m in matmuls]
    arrays = {i.name: numpy_helper.to_array(i) for i in parted.graph.initializer}
    assert weight.name not in arrays and all(arrays[m.input[1]].nbytes <= widest for m in matmuls)
    whole_arrays = {i.name: numpy_helper.to_array(i) for i in whole.graph.initializer}
    held = held_weights(whole.graph.node[-1], whole_arrays)
    assert np.array_equal(np.concatenate([held_weights(m, arrays) for m in matmuls], axis=1), held)

    x = np.random.default_rng(3).normal(0, 1, (1, 5, K)).astype(np.float32)
    produced = [ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for p in (whole, parted)]
    inputs = np.abs(with_block_sums(x) if len(held) > K else x)  # Q4_1's: K + K / 32 inputs, its last block short
    blocks = -(-inputs.shape[-1] // weight_grids.BLOCK)
    padded = np.pad(inputs, [(0, 0), (0, 0), (0, blocks * weight_grids.BLOCK - inputs.shape[-1])])
    largest = np.repeat(padded.reshape(1, 5, blocks, -1).max(-1), weight_grids.BLOCK, -1)[..., :inputs.shape[-1]]
    magnitude = (inputs + largest / 254) @ np.abs(held)
    assert np.all(np.abs(produced[1] - produced[0]) <= 2 * (blocks + 1) * EPS * magnitude)


def run(*args) -> None:
    result = cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("target, int8_block_size, regridded", [
    ("x86", None, False), ("arm64", None, False), ("x86-vnni", None, True), ("x86-vnni", 32, False)])
def test_an_8_bit_grid_goes_into_longer_8_bit_blocks(target, int8_block_size, regridded):
    """int4 keeps every 4-bit grid; an 8-bit one (Q8_0's blocks of 32) only where the target's 8-bit blocks are no
    longer, and otherwise goes into them with a reason naming both sizes."""
    recipe = Recipe.of(QuantizeOptions(mode="int4", target=target, int8_block_size=int8_block_size))
    kept, moved = kept_grids({"/q4": 4, "/q8": 8}, recipe)
    assert kept == ({"/q4": 4} if regridded else {"/q4": 4, "/q8": 8})
    assert list(moved) == (["/q8"] if regridded else [])
    if regridded:
        assert f"blocks of {weight_grids.BLOCK}" in moved["/q8"] and f"blocks of {recipe.eight_bit_block_size}" in \
            moved["/q8"] and recipe.eight_bit_block_size > weight_grids.BLOCK


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
        "--calib", ud / "en_ewt_dev.txt", "--eval", ud / "en_ewt_test.txt", "--exclude", kept,
        "--target", "x86")  # 8-bit blocks of 32: its Q8_0 grid kept too (kept_grids)
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
        held = held_weights(node, arrays)
        k = weight.shape[0]
        # a grid with offsets: its residuals rounded to 4 bits, each off by at most 1/14 of the largest of its 32
        residual_error = np.abs(held[k:]).max() / 14 if len(held) > k else 0.0
        assert np.abs(effective_weights(held, k) - weight).max() <= reconstruction_bound(weight) + residual_error, name

    run("package", "--model", tmp_path / "int4", "--out", tmp_path / "int4.spj")
    manifest = json.loads((tmp_path / "int4.spj" / "spj.json").read_text())
    assert manifest["logits"] == "last" and manifest["checks"]["package"]["greedy_identical"]
    # the head's block sums are taken of the last position alone, as its MatMul is
    packaged = onnx.load(str(tmp_path / "int4.spj" / "model.onnx"), load_external_data=False).graph
    readers = {n.name: list(n.input) for n in packaged.node if n.name.startswith("/lm_head/block_sums/")}
    assert readers["/lm_head/block_sums/Reshape"][0] == readers["/lm_head/block_sums/Concat"][0] == \
        "/lm_head/last_position/Gather_output_0"
