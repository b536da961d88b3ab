"""Weights that are block-quantized already: a GGUF's Q4_0, Q4_1, Q4_K and Q8_0 tensors, which `spj-edge import
--gguf` dequantizes to float. int4 would round them again onto a grid of its own, adding a second rounding error to
the first (SmolLM2-135M's Q4_1 file: +5.3 % bits per byte with AWQ; llama.cpp's own Q4_0 of it, +6.7 %). Written as
MatMulNBits on the grid they are on, they lose nothing.

A block of 32 weights along a MatMul's input axis (a GGUF block, and a K-quant's sub-block) is on a grid when
w = origin + step · code for all 32, to float32's rounding (ON_GRID):
    Q4_1         code 0..15: the block's minimum at 0, its maximum at 15
    Q4_0         code -8..7: its largest magnitude at -8, no offset
    Q4_K         code 0..15, a sub-block's own step and minimum, not always reaching 0 or 15: the step is then the
                 smallest gap between the block's values
    Q8_0         code -127..127: its largest magnitude at ±127, no offset
32 float weights land that close to a 16-level grid fitted to them by chance with odds of about 10^-140: a float
checkpoint is on no grid, and goes through int4's own rounding as before.

MatMulNBits computes x @ (step · (code - 8)) per block (its default zero point; a float zero point sends
onnxruntime 1.32 to a path 70x slower); the rest, x @ (offset + 8 · step), is constant over each block, so it is
(x's block sums) @ offsets: Reshape and ReduceSum, a MatMul with the [blocks, N] offsets and an Add. The offsets are
float32: 6 bits a weight where Q4_0's form takes 5 (llama.cpp's Q4_1 takes 5 bits where its Q4_0 takes 4.5).
Q4_0 and Q8_0 need none of that.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32  # GGUF's block for Q4_0, Q4_1 and Q8_0, and the K-quants' sub-block
# How far a weight may be from its grid point: a hundred-thousandth of a step, plus float32's rounding of the block's
# values and of the step found from them (its error times up to 15 codes). A looser bound would let a Q4_1 block pass
# as Q4_0 with a step 6e-5 off (its largest value at code 0): 1e-4 wrong at code 15.
ON_GRID = 1e-5
ROUNDING = 32 * float(np.finfo(np.float32).eps)


@dataclass
class Grid:
    """A [K, N] weight as MatMulNBits holds it: w[k, n] = steps[n, b] · (codes[n, b, k % BLOCK] - 2^(bits-1)) +
    offsets[n, b], b = k // BLOCK."""
    bits: int
    codes: np.ndarray  # uint8 [N, blocks, BLOCK]
    steps: np.ndarray  # float32 [N, blocks]
    offsets: np.ndarray | None  # float32 [N, blocks], None where every block's is 0

    def dequantized(self) -> np.ndarray:
        middle = 1 << (self.bits - 1)
        w = self.steps[..., None] * (self.codes.astype(np.float32) - middle)
        if self.offsets is not None:
            w += self.offsets[..., None]
        return w.reshape(w.shape[0], -1).T


def find(weight: np.ndarray) -> Grid | None:
    """The grid the MatMul weight [K, N] (x @ weight) is on, in blocks along K; None if it is on none. The first
    column is tried alone first, so that a float weight is turned down without a pass over all of it."""
    k, n = weight.shape
    if k % BLOCK or weight.dtype != np.float32:
        return None
    if _grid(weight[:, :1]) is None:
        return None
    return _grid(weight)


def _grid(weight: np.ndarray) -> Grid | None:
    blocks = weight.T.reshape(weight.shape[1], -1, BLOCK).astype(np.float64)
    tolerance = ROUNDING * np.abs(blocks).max(-1, keepdims=True)
    low, high = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    gaps = np.diff(np.sort(blocks, -1), axis=-1)
    gaps = np.where(gaps > 1e-6 * (high - low), gaps, np.inf).min(-1, keepdims=True)
    # 4 bits, w = origin + step · code, code 0..15; each block takes the first of these that it is on
    # Q4_0 first: a block on both forms is written without an offset, and a tensor without any needs no correction
    candidates = [(-largest / 8, largest),  # Q4_0: the largest magnitude at code 0 (-8 · step, a negative step if it
                                            # is positive), no offset
                  ((high - low) / 15, low),  # Q4_1: the minimum at code 0, the maximum at 15
                  (np.where(np.isinf(gaps), 0, gaps), low)]  # Q4_K: a sub-block's codes need not reach 0 or 15
    codes, steps, origins = np.zeros_like(blocks), np.zeros_like(low), np.zeros_like(low)
    placed = np.zeros(low.shape, bool)
    for step, origin in candidates:
        found, on = _codes(blocks - origin, step, 0, 15, tolerance)
        take = on & ~placed
        codes, steps, origins = np.where(take, found, codes), np.where(take, step, steps), np.where(take, origin, origins)
        placed |= on
    if placed.all():
        offsets = (origins + 8 * steps)[..., 0]  # Q4_0's: largest - 8 · largest / 8, exactly 0
        return Grid(4, codes.astype(np.uint8), steps[..., 0].astype(np.float32),
                    offsets.astype(np.float32) if offsets.any() else None)

    step = np.abs(largest) / 127  # Q8_0: the largest magnitude at ±127
    codes, on = _codes(blocks, step, -127, 127, tolerance)
    if on.all():
        return Grid(8, (codes + 128).astype(np.uint8), step[..., 0].astype(np.float32), None)
    return None


def _codes(values: np.ndarray, step: np.ndarray, lowest: int, highest: int, tolerance: np.ndarray):
    """Each value's nearest code on the grid `step` · code, and per block whether every value is on it (within ON_GRID
    of a step and `tolerance`) and within the code range."""
    step = np.where(step == 0, 1.0, step)  # a constant block: every code is 0, every value its origin
    codes = np.rint(values / step)
    distance = np.abs(values - codes * step)
    on = ((codes >= lowest) & (codes <= highest) & (distance <= ON_GRID * np.abs(step) + tolerance)).all(
        -1, keepdims=True)
    return codes, on


def find_all(proto: onnx.ModelProto, matmuls: list[str]) -> dict[str, int]:
    """The weight MatMuls among `matmuls` whose weights are on a grid, and its bits."""
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    found = {}
    for name in matmuls:
        grid = find(numpy_helper.to_array(weights[nodes[name].input[1]]))
        if grid is not None:
            found[name] = grid.bits
    return found


def write(proto: onnx.ModelProto, matmuls: list[str], accuracy_level: int) -> None:
    """Replace each MatMul of `matmuls` (each on a grid: find_all's) by MatMulNBits on its grid, in place."""
    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    constants: set[str] = set()
    for name in matmuls:
        node = next(n for n in graph.node if n.name == name)
        weight = numpy_helper.to_array(weights[node.input[1]])
        grid = find(weight)  # found again rather than kept from find_all: a whole model's codes would be held meanwhile
        k, n = weight.shape
        scope = name.rsplit("/", 1)[0]
        stem = node.input[1]
        codes = grid.codes if grid.bits == 8 else grid.codes[..., 0::2] | (grid.codes[..., 1::2] << 4)
        added = [numpy_helper.from_array(codes, f"{stem}.q{grid.bits}"),
                 numpy_helper.from_array(grid.steps.reshape(-1), f"{stem}.steps")]
        product = node.output[0] if grid.offsets is None else f"{scope}/MatMulNBits_output_0"
        replacement = [helper.make_node("MatMulNBits", [node.input[0], added[0].name, added[1].name], [product],
                                        name=f"{scope}/MatMulNBits", domain="com.microsoft", K=k, N=n,
                                        bits=grid.bits, block_size=BLOCK, accuracy_level=accuracy_level)]
        if grid.offsets is not None:
            shape, last = f"/block_sums/shape_{k}", "/block_sums/last_axis"
            for constant, value in ((shape, [0, 0, k // BLOCK, BLOCK]), (last, [-1])):
                if constant not in constants:
                    added.append(numpy_helper.from_array(np.array(value, np.int64), constant))
                    constants.add(constant)
            added.append(numpy_helper.from_array(np.ascontiguousarray(grid.offsets.T), f"{stem}.offsets"))
            blocks, sums = f"{scope}/block_sums/Reshape_output_0", f"{scope}/block_sums/ReduceSum_output_0"
            shift = f"{scope}/offsets/MatMul_output_0"
            replacement += [
                helper.make_node("Reshape", [node.input[0], shape], [blocks], name=f"{scope}/block_sums/Reshape"),
                helper.make_node("ReduceSum", [blocks, last], [sums], name=f"{scope}/block_sums/ReduceSum",
                                 keepdims=0),
                helper.make_node("MatMul", [sums, f"{stem}.offsets"], [shift], name=f"{scope}/offsets/MatMul"),
                helper.make_node("Add", [product, shift], [node.output[0]], name=f"{scope}/offsets/Add")]
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        if not any(stem in n.input for n in graph.node):
            graph.initializer.remove(weights[stem])
        graph.initializer.extend(added)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
