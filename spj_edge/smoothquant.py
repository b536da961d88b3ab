"""Static int8 on a real LM: activation statistics from the calibration feeds, SmoothQuant migration into every weight
MatMul whose input can be rescaled exactly, and the choice, from those statistics alone, of what per-tensor int8
would still break.

Real LMs have a few activation channels 10-1,000x larger than the rest (SmolLM2-135M: a `down_proj` input channel at
3,354 where the median channel's maximum is 1.1). One static scale per tensor, fitted to such a channel, leaves the
others a handful of int8 levels. SmoothQuant divides input channel j by s_j = max|x_j|^α / max|W_j|^(1-α) and
multiplies row j of the weight by s_j: the product is unchanged, the outlier moves into the weight, whose scales are
per output column. The division is folded into whatever makes the input, so the graph gains no node:
    RMSNorm → MatMul            the norm's gamma                              (q/k/v, gate/up, LM head)
    attention → o_proj          the V columns of the q/k/v MatMul (softmax mixes positions, not channels)
    silu(gate) · up → down      the `up` columns of the gate/up MatMul
α is chosen per MatMul, the one that minimises the int8 error of its output on the calibration sample; a MatMul whose
error stays over the target profile's `blockwise_above` after that gets 8-bit weights in blocks instead, its activations
rounded per block as the kernel runs (x86 and arm64: 2.5 %, on SmolLM2 every `down_proj` and a few `o_proj`; x86-vnni:
0, every MatMul, as onnxruntime's block kernel is the faster one there), and its α is chosen again by the estimate of
that rounding (an outlier channel coarsens the rest of its block: SmolLM2 in blocks of 128, +0.34 → +0.11 % bits per
byte).
The activation ranges then go to ONNX Runtime's quantizer as its own calibration cache, so that its calibrators
(minutes and gigabytes on a 135M model) never run.
int4 (weights only, in blocks of 32) folds AWQ's scales the same way: s_j = mean|x_j|^α, α per MatMul by the
estimated 4-bit error of its output, so that the channels that carry the most signal are rounded the finest.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
# 8-bit blocks round the weights finely enough that an outlier can go further into them; their input's rounding
# only spoils the block an outlier is in, so less scaling may do
BLOCK_ALPHAS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9)
INT4_ALPHAS = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)  # AWQ's; on SmolLM2-135M it picks 0.1-0.5 from a grid of tenths
# int4's estimate (weights alone rounded, in blocks of 32) on SmolLM2-135M: 2-12 % for every MatMul, 1.5-12 % after
# AWQ's scaling, no outlier among them; over this, a MatMul gets 8-bit weights (MatMulNBits too) instead.
EIGHT_BITS_ABOVE = 0.15
SAMPLE_ROWS = 256  # calibration tokens kept per input for the error estimate
WEIGHT_COLUMNS = 1024  # output columns the estimate uses (the LM head has 49,152)


@dataclass
class ActivationStatistics:
    """Per weight-MatMul input: the per-channel extremes over every calibration feed, and a sample of its rows."""
    low: dict[str, np.ndarray]
    high: dict[str, np.ndarray]
    sample: dict[str, np.ndarray]

    @classmethod
    def collect(cls, session_outputs, names: list[str], tokens: int) -> ActivationStatistics:
        """`session_outputs`: an iterable of {tensor name: value}, one per calibration feed, `tokens` rows in all."""
        low, high, rows = {}, {}, {n: [] for n in names}
        stride, seen = max(1, -(-tokens // SAMPLE_ROWS)), 0  # every stride-th token is kept for the sample
        for outputs in session_outputs:
            for name in names:
                x = outputs[name].reshape(-1, outputs[name].shape[-1])
                low[name] = np.minimum(low[name], x.min(0)) if name in low else x.min(0)
                high[name] = np.maximum(high[name], x.max(0)) if name in high else x.max(0)
                rows[name].append(x[(-seen) % stride::stride].copy())
            seen += len(x)
        return cls(low, high, {name: np.concatenate(parts) for name, parts in rows.items()})

    def absmax(self, name: str) -> np.ndarray:
        return np.maximum(np.abs(self.low[name]), np.abs(self.high[name]))


@dataclass
class Fold:
    """Where the 1/s of a MatMul's input goes: the `columns` of the initializer `tensor` (along its last axis).
    `heads`: (KV heads, query heads per KV head, head size) where the input is grouped-query attention's output, whose
    query heads of one KV group all read the same V columns: their channels share one s."""
    tensor: str
    columns: slice
    heads: tuple[int, int, int] | None = None


@dataclass
class Plan:
    """Per weight MatMul: its scaling α (0: none) and the scale itself, its estimated error, and why it is kept at a
    higher precision (float for static int8, 8-bit weights for int4), if it is."""
    alpha: dict[str, float]
    error: dict[str, float]
    kept: dict[str, str]
    scales: dict[str, np.ndarray]


def folds(proto: onnx.ModelProto, config) -> dict[str, Fold]:
    """The weight MatMuls whose input can be rescaled exactly, and how: by the fused graph's structure, not by name."""
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1

    def split_section(tensor: str):
        """(the weight MatMul, the column slice) that a Split output of that MatMul's output holds."""
        split = producer.get(tensor)
        if split is None or split.op_type != "Split" or len(split.input) < 2 or split.input[1] not in initializers:
            return None
        matmul = producer.get(split.input[0])
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in initializers:
            return None
        sizes = numpy_helper.to_array(initializers[split.input[1]]).tolist()
        index = list(split.output).index(tensor)
        start = sum(sizes[:index])
        return matmul, slice(start, start + sizes[index])

    def packed_v(tensor: str):
        """(the weight MatMul, the V columns) of q, k and v packed as that MatMul makes them."""
        matmul = producer.get(tensor)
        if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in initializers:
            return None
        width = initializers[matmul.input[1]].dims[1]
        return matmul, slice(width - config.num_key_value_heads * config.head_dim, width)

    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or uses.get(node.input[0]) != 1:
            continue
        source = producer.get(node.input[0])
        if source is None:
            continue
        if (source.op_type == "SkipSimplifiedLayerNormalization" and source.output[0] == node.input[0]
                and source.input[2] in initializers and uses.get(source.input[2]) == 1):
            found[node.name] = Fold(source.input[2], slice(None))
        elif source.op_type == "GroupQueryAttention" and source.output[0] == node.input[0]:
            section = split_section(source.input[2]) if source.input[2] else packed_v(source.input[0])
            heads = (config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads,
                     config.head_dim)
            if section is not None and uses.get(section[0].input[1]) == 1:
                found[node.name] = Fold(section[0].input[1], section[1], heads)
        elif source.op_type == "Mul":
            # silu(gate) * up: rescaling `up` rescales the product
            for operand in source.input:
                section = split_section(operand)
                if section is not None and uses.get(operand) == 1 and uses.get(section[0].input[1]) == 1:
                    found[node.name] = Fold(section[0].input[1], section[1])
                    break
    return found


def _int8_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric int8, one scale per output column (the profiles' per-channel weights), dequantized."""
    scale = np.maximum(np.abs(w).max(0, keepdims=True), 1e-12) / 127
    return np.round(w / scale) * scale


def _uint8_activation(x: np.ndarray) -> np.ndarray:
    """Asymmetric uint8 over the tensor's range, zero included, dequantized: what a static per-tensor scale gives."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = np.float32(max(high - low, 1e-12) / 255)
    zero = np.round(-low / scale).astype(np.float32)  # float32 throughout: a float64 scalar would widen the GEMM
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def int4_weight(w: np.ndarray, block: int) -> np.ndarray:
    """Symmetric 4-bit blocks of `block` rows along the input axis, dequantized: MatMulNBits' symmetric form (and
    llama.cpp's Q4_0), the scale the block's largest magnitude over -8, so that it lands on -8 exactly."""
    rows, columns = w.shape
    blocks = np.pad(w, ((0, -rows % block), (0, 0))).reshape(-1, block, columns)  # the last block zero-padded
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)
    scale = np.where(largest == 0, 1, largest / -8)
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(-1, columns)[:rows]


def _int8_blocks(a: np.ndarray, block: int, axis: int) -> np.ndarray:
    """Symmetric int8 in blocks of `block` along `axis` (the input axis), dequantized: what MatMulNBits' 8-bit weights
    hold and what its int8 compute makes of the activations, a scale per block of each row as it runs."""
    moved = np.moveaxis(a, axis, -1)
    length = moved.shape[-1]
    blocks = np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, -length % block)]).reshape(*moved.shape[:-1], -1, block)
    scale = np.maximum(np.abs(blocks).max(-1, keepdims=True), 1e-12) / 127
    rounded = (np.round(blocks / scale) * scale).reshape(*moved.shape[:-1], -1)[..., :length]
    return np.moveaxis(rounded, -1, axis)


@dataclass(frozen=True)
class Mode:
    """How a quantization mode rounds a weight MatMul, for the estimates that choose its scaling and what it keeps at
    a higher precision (when its estimated error is over `keep_above`).
    static int8 (SmoothQuant): s_j = max|x_j|^α / max|W_j|^(1-α); the input is rounded too, per tensor.
    8-bit blocks: the same scale; weights and input rounded per block of `block_size` inputs.
    int4 weights (AWQ): s_j = mean|x_j|^α, so that the channels that carry the most signal get the finest steps."""
    name: str
    alphas: tuple[float, ...]
    keep_above: float
    block_size: int | None = None  # int4 and 8-bit blocks

    @property
    def activation_aware(self) -> bool:
        return self.name == "int4"

    def product(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        if self.name == "int4":
            return x @ int4_weight(w, self.block_size)
        if self.name == "8-bit block":
            return _int8_blocks(x, self.block_size, 1) @ _int8_blocks(w, self.block_size, 0)
        return _uint8_activation(x) @ _int8_weight(w)


def static(blockwise_above: float) -> Mode:
    """Static int8, a MatMul whose estimated error is over `blockwise_above` (the target profile's) in 8-bit blocks."""
    return Mode("int8", ALPHAS, blockwise_above)


def eight_bit_blocks(block_size: int) -> Mode:
    """What static int8 gives 8-bit block weights: scaled as its estimate says, never kept any higher."""
    return Mode("8-bit block", BLOCK_ALPHAS, np.inf, block_size)


def int4(block_size: int) -> Mode:
    return Mode("int4", INT4_ALPHAS, EIGHT_BITS_ABOVE, block_size)


def output_error(mode: Mode, x: np.ndarray, w: np.ndarray, reference: np.ndarray) -> float:
    """The median over tokens of the relative error of x @ w as `mode` rounds it (a median, as the few tokens with
    massive activations would otherwise set the figure alone); `reference`: x @ w in float."""
    error = np.linalg.norm(mode.product(x, w) - reference, axis=1)
    return float(np.median(error / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)))


def channel_scale(magnitude: np.ndarray, weight_max: np.ndarray | None, alpha: float, fold: Fold) -> np.ndarray:
    """s_j = magnitude_j^α / weight_max_j^(1-α) (no weight term without `weight_max`), one per input channel of the
    MatMul; under grouped-query attention the channels of one KV group share their largest figures, so that one
    division of a V column serves them all."""
    if weight_max is None:
        weight_max = np.ones_like(magnitude)
    if fold.heads is not None:
        magnitude, weight_max = (a.reshape(fold.heads).max(1, keepdims=True) for a in (magnitude, weight_max))
    scale = np.where(magnitude > 0, np.clip(magnitude ** alpha / np.maximum(weight_max, 1e-8) ** (1 - alpha), 1e-5,
                                            None), 1.0).astype(np.float32)
    return np.broadcast_to(scale, fold.heads).reshape(-1) if fold.heads is not None else scale


def plan(proto: onnx.ModelProto, statistics: ActivationStatistics, found: dict[str, Fold], matmuls: list[str],
         mode: Mode, alpha: float | None = None, exact: Collection[str] = ()) -> Plan:
    """α per MatMul (`alpha` fixes it; 0 turns scaling off), its estimated error, and which MatMuls `mode` keeps at a
    higher precision. The estimate runs in float32 on a sample of the calibration tokens and of the output columns.
    `exact`: MatMuls whose weights are written without error (weight_grids.py), so neither scaled nor estimated, nor
    rescaled by another's fold (o_proj's goes into the V columns of q/k/v's weight, down's into up's)."""
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    fixed = {nodes[name].input[1] for name in exact}
    alphas, errors, kept, scales = {}, {}, {}, {}
    for name in matmuls:
        node = nodes[name]
        if name in exact:
            alphas[name], errors[name] = 0.0, 0.0
            continue
        x = statistics.sample[node.input[0]]
        w = numpy_helper.to_array(weights[node.input[1]])
        magnitude = (np.abs(x).mean(0) if mode.activation_aware else statistics.absmax(node.input[0]))
        weight_max = None if mode.activation_aware else np.abs(w).max(1)
        w = w[:, np.linspace(0, w.shape[1] - 1, min(WEIGHT_COLUMNS, w.shape[1])).astype(int)]
        reference = x @ w  # scaling leaves the product as it is, up to rounding
        if name not in found or alpha == 0 or found[name].tensor in fixed:
            candidates = (0.0,)
        else:
            candidates = (0.0, *mode.alphas) if alpha is None else (alpha,)
        best = None
        for a in candidates:
            s = channel_scale(magnitude, weight_max, a, found[name]) if a else None
            scaled = (x, w) if s is None else (x / s, w * s[:, None])
            error = output_error(mode, *scaled, reference)
            if best is None or error < best[1]:
                best = (a, error, s)
        alphas[name], errors[name] = best[:2]
        if best[2] is not None:
            scales[name] = best[2]
        if best[1] > mode.keep_above:
            over = f"over {mode.keep_above:.1%}" if mode.keep_above else "every MatMul, by the target's profile"
            kept[name] = (f"{mode.name} error of its output estimated at {best[1]:.1%} on the calibration text ({over})"
                          f"{f', after scaling (alpha {best[0]})' if best[0] else ''}")
    return Plan(alphas, errors, kept, scales)


def apply(proto: onnx.ModelProto, found: dict[str, Fold], chosen: Plan, scaled: list[str]) -> dict[str, np.ndarray]:
    """Fold the chosen scaling of the MatMuls `scaled` into `proto`, in place; returns each one's input scale."""
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}

    def update(name: str, change) -> None:
        weights[name].CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(weights[name]).copy()), name))

    # the scales came from the original weights; a fold changes another MatMul's weight (o_proj's, the V columns of
    # q/k/v; down's, the up columns of gate/up), which is fine as each column and row is scaled once
    applied = {name: chosen.scales[name] for name in scaled if name in chosen.scales}
    for name, s in applied.items():
        fold = found[name]
        source = s.reshape(fold.heads)[:, 0, :].reshape(-1) if fold.heads is not None else s

        def divide(t, columns=fold.columns, by=source):
            t[..., columns] /= by
            return t

        update(nodes[name].input[1], lambda w, s=s: w * s[:, None])
        update(fold.tensor, divide)
    return {nodes[name].input[0]: s for name, s in applied.items()}


def ranges(statistics: ActivationStatistics, scales: dict[str, np.ndarray], tensors: list[str], percentile: float | None
           ) -> dict[str, tuple[np.float32, np.float32]]:
    """Each quantized input's (low, high) after smoothing: its extremes (min/max), or a percentile of the sample."""
    found = {}
    for name in tensors:
        s = scales.get(name, np.float32(1))
        if percentile is None:
            low, high = (statistics.low[name] / s).min(), (statistics.high[name] / s).max()
        else:
            low, high = np.percentile(statistics.sample[name] / s, [100 - percentile, percentile])
        found[name] = (np.float32(min(low, 0)), np.float32(max(high, 0)))
    return found
