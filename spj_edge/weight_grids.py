"""Weights that are block-quantized already: a GGUF's Q4_0, Q4_1, Q4_K and Q8_0 tensors, which `spj-edge import
--gguf` dequantizes to float. int4 would round them again onto a grid of its own, adding a second rounding error to
the first (SmolLM2-135M's Q4_1 file: +5.3 % bits per byte with AWQ; llama.cpp's own Q4_0 of it, +6.7 %). Written as
MatMulNBits on the grid they are on, they lose nothing but a sliver of a Q4_1 block's offset (below).

A block of 32 weights along a MatMul's input axis (a GGUF block, and a K-quant's sub-block) is on a grid when
w = origin + step · code for all 32, to float32's rounding (ON_GRID):
    Q4_1         code 0..15: the block's minimum at 0, its maximum at 15
    Q4_0         code -8..7: its largest magnitude at -8, no offset
    Q4_K         code 0..15, a sub-block's own step and minimum, not always reaching 0 or 15: the step is then the
                 smallest gap between the block's values
    Q8_0         code -127..127: its largest magnitude at ±127, no offset
32 float weights land that close to a 16-level grid fitted to them by chance with odds of about 10^-140: a float
checkpoint is on no grid, and goes through int4's own rounding as before.

MatMulNBits computes x @ (step · (code - zero point)) per block with an integer zero point (a float one sends
onnxruntime 1.32 to a path 70x slower). What an integer zero point leaves of a Q4_1 block's offset is constant over
the block, so it is (x's block sums) @ residuals: the MatMul reads [x, x's block sums] (Reshape, ReduceSum, Concat)
and the residuals are 4-bit weights of its own below the block's (with_offsets_as_weights): one MatMulNBits, 5.3
bits a weight where Q4_0's form takes 5 (4-bit codes, a float32 step per 32). It replaced a float32 MatMul of the
block sums with the offsets and an Add (6 bits a weight, a node more): SmolLM2-135M's int4 decodes 1.18x as fast
(1 thread), 142 → 134 MB, bits per byte +0.15 → +0.12 %, KL 0.0062 → 0.0080. Q4_0 and Q8_0 need none of it.
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


def with_offsets_as_weights(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 4-bit grid with offsets as MatMulNBits takes it with integer zero points, over the input x' = [x, x's block
    sums]: (codes [N, blocks', BLOCK], steps [N, blocks'], zero points [N, blocks']). Each block keeps its codes and
    step and takes the zero point that leaves the least of its offset, w = step · (code − zero) + residual, |residual|
    ≤ step / 2 wherever the block's range holds 0. The residuals, one a block, are the weights of the block sums,
    rounded to symmetric 4 bits in blocks of 32 of them (a column's 32 neighbouring blocks): the one error written,
    a residual off by at most 1/14 of the largest of its 32, so by 1/28 of a step where the steps are alike (Q4_1
    itself rounded each weight by up to half of one)."""
    n, blocks = grid.steps.shape
    steps = grid.steps.astype(np.float64)
    shift = np.divide(grid.offsets, steps, out=np.zeros_like(steps), where=steps != 0)
    zero = np.clip(8 - np.rint(shift), 0, 15)
    residual = grid.offsets - steps * (8 - zero)
    residual = np.pad(residual, ((0, 0), (0, -blocks % BLOCK))).reshape(n, -1, BLOCK)
    largest = np.abs(residual).max(-1, keepdims=True)
    scale = np.where(largest == 0, 1.0, largest / 7)  # ±7: residuals of either sign are alike
    residual_codes = np.rint(residual / scale) + 8
    codes = np.concatenate([grid.codes, residual_codes.astype(np.uint8)], axis=1)
    return (codes, np.concatenate([grid.steps, scale[..., 0].astype(np.float32)], axis=1),
            np.concatenate([zero, np.full(scale.shape[:2], 8)], axis=1).astype(np.uint8))


def _packed(codes: np.ndarray) -> np.ndarray:
    """4-bit values two to a byte along the last axis, the first in the low half, as MatMulNBits reads them."""
    codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, codes.shape[-1] % 2)])
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def write(proto: onnx.ModelProto, matmuls: list[str], accuracy_level: int) -> None:
    """Replace each MatMul of `matmuls` (each on a grid: find_all's) by MatMulNBits on its grid, in place; a grid
    with offsets reads its input with the input's block sums appended (Reshape, ReduceSum, Concat: once an input)."""
    graph = proto.graph
    weights = {i.name: i for i in graph.initializer}
    constants: set[str] = set()
    appended: dict[str, str] = {}  # an input → the input with its block sums appended
    for name in matmuls:
        node = next(n for n in graph.node if n.name == name)
        weight = numpy_helper.to_array(weights[node.input[1]])
        grid = find(weight)  # found again rather than kept from find_all: a whole model's codes would be held meanwhile
        k, n = weight.shape
        scope, stem, source = name.rsplit("/", 1)[0], node.input[1], node.input[0]
        replacement, added = [], []
        if grid.offsets is None:
            codes, steps, zeros, inputs = grid.codes, grid.steps, None, k
        else:
            codes, steps, zeros = with_offsets_as_weights(grid)
            inputs = k + k // BLOCK
            if source not in appended:
                shape, last = f"/block_sums/shape_{k}", "/block_sums/last_axis"
                for constant, value in ((shape, [0, 0, k // BLOCK, BLOCK]), (last, [-1])):
                    if constant not in constants:
                        added.append(numpy_helper.from_array(np.array(value, np.int64), constant))
                        constants.add(constant)
                blocks, sums = f"{scope}/block_sums/Reshape_output_0", f"{scope}/block_sums/ReduceSum_output_0"
                appended[source] = f"{scope}/block_sums/Concat_output_0"
                replacement += [
                    helper.make_node("Reshape", [source, shape], [blocks], name=f"{scope}/block_sums/Reshape"),
                    helper.make_node("ReduceSum", [blocks, last], [sums], name=f"{scope}/block_sums/ReduceSum",
                                     keepdims=0),
                    helper.make_node("Concat", [source, sums], [appended[source]], name=f"{scope}/block_sums/Concat",
                                     axis=-1)]
            source = appended[source]
        tensors = [numpy_helper.from_array(codes if grid.bits == 8 else _packed(codes), f"{stem}.q{grid.bits}"),
                   numpy_helper.from_array(steps.reshape(-1), f"{stem}.steps")]
        if zeros is not None:
            tensors.append(numpy_helper.from_array(_packed(zeros), f"{stem}.zero_points"))
        added += tensors
        replacement.append(helper.make_node(
            "MatMulNBits", [source, *(t.name for t in tensors)], [node.output[0]],
            name=f"{scope}/MatMulNBits", domain="com.microsoft", K=inputs, N=n, bits=grid.bits, block_size=BLOCK,
            accuracy_level=accuracy_level))
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        if not any(stem in n.input for n in graph.node):
            graph.initializer.remove(weights[stem])
        graph.initializer.extend(added)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
