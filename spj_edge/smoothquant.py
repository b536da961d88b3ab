"""Static int8 on a real LM: activation statistics from the calibration feeds, SmoothQuant migration into every weight
MatMul whose input can be rescaled exactly, and the choice, from those statistics alone, of what stays in float.

Real LMs have a few activation channels 10-1,000x larger than the rest (SmolLM2-135M: a `down_proj` input channel at
3,354 where the median channel's maximum is 1.1). One static scale per tensor, fitted to such a channel, leaves the
others a handful of int8 levels. SmoothQuant divides input channel j by s_j = max|x_j|^α / max|W_j|^(1-α) and
multiplies row j of the weight by s_j: the product is unchanged, the outlier moves into the weight, whose scales are
per output column. The division is folded into whatever makes the input, so the graph gains no node:
    RMSNorm → MatMul            the norm's gamma                              (q/k/v, gate/up, LM head)
    attention → o_proj          the V columns of the q/k/v MatMul (softmax mixes positions, not channels)
    silu(gate) · up → down      the `up` columns of the gate/up MatMul
α is chosen per MatMul, the one that minimises the int8 error of its output on the calibration sample; a MatMul whose
error stays over FLOAT_ABOVE after that is kept in float (on SmolLM2: most `down_proj`, a few `o_proj`).
The activation ranges then go to ONNX Runtime's quantizer as its own calibration cache, so that its calibrators
(minutes and gigabytes on a 135M model) never run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
# The median over calibration tokens of |int8 output - float output| / |float output|, above which a MatMul stays in
# float. On SmolLM2-135M (30 layers) the q/k/v and gate/up MatMuls estimate at 0.9-1.6 %, `o_proj` at 1-4 %,
# `down_proj` at 2.6-23 %. Static int8 of all of them (smoothed) costs +2-5 % bits per byte on held-out text; keeping
# those over 3 % in float, +1.02 %; over 2.5 % (every down_proj and 10 o_proj), +0.23 %.
FLOAT_ABOVE = 0.025
SAMPLE_ROWS = 512  # calibration tokens kept per input for the error estimate
WEIGHT_COLUMNS = 4096  # output columns the estimate uses (the LM head has 49,152)


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
    """Per weight MatMul: its smoothing α (0: none), its estimated int8 error, and why it stays float, if it does."""
    alpha: dict[str, float]
    error: dict[str, float]
    float_kept: dict[str, str]


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
            section = split_section(source.input[2])
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


def _quantized_weight(w: np.ndarray) -> np.ndarray:
    """Symmetric int8, one scale per output column (the profiles' per-channel weights), dequantized."""
    scale = np.maximum(np.abs(w).max(0, keepdims=True), 1e-12) / 127
    return np.round(w / scale) * scale


def _quantized_activation(x: np.ndarray) -> np.ndarray:
    """Asymmetric uint8 over the tensor's range, zero included, dequantized: what a static per-tensor scale gives."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = np.round(-low / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def output_error(x: np.ndarray, w: np.ndarray) -> float:
    """The median over tokens of the relative error of x @ w when both are int8 (a median, as the few tokens with
    massive activations would otherwise set the figure alone)."""
    reference = x @ w
    error = np.linalg.norm(_quantized_activation(x) @ _quantized_weight(w) - reference, axis=1)
    return float(np.median(error / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)))


def smoothing_scale(absmax: np.ndarray, weight: np.ndarray, alpha: float, fold: Fold) -> np.ndarray:
    """s_j = max|x_j|^α / max|W_j|^(1-α), one per input channel of the MatMul; under grouped-query attention the
    channels of one KV group share their largest figures, so that one division of a V column serves them all."""
    weight_max = np.abs(weight).max(1)
    if fold.heads is not None:
        shape = fold.heads
        absmax, weight_max = (a.reshape(shape).max(1, keepdims=True) for a in (absmax, weight_max))
    scale = np.where(absmax > 0, np.clip(absmax ** alpha / np.maximum(weight_max, 1e-8) ** (1 - alpha), 1e-5, None),
                     1.0).astype(np.float32)
    return np.broadcast_to(scale, fold.heads).reshape(-1) if fold.heads is not None else scale


def plan(proto: onnx.ModelProto, statistics: ActivationStatistics, found: dict[str, Fold], matmuls: list[str],
         alpha: float | None) -> Plan:
    """α per MatMul (`alpha` fixes it; 0 turns smoothing off), its estimated error, and which MatMuls stay float."""
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    alphas, errors, kept = {}, {}, {}
    for name in matmuls:
        node = nodes[name]
        x = statistics.sample[node.input[0]].astype(np.float64)
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float64)
        columns = np.linspace(0, w.shape[1] - 1, min(WEIGHT_COLUMNS, w.shape[1])).astype(int)
        if name not in found or alpha == 0:
            candidates = (0.0,)  # no smoothing
        else:
            candidates = (0.0, *ALPHAS) if alpha is None else (alpha,)
        best = None
        for a in candidates:
            s = (smoothing_scale(statistics.absmax(node.input[0]), w, a, found[name]) if a else
                 np.ones(w.shape[0], np.float32))
            error = output_error(x / s, (w * s[:, None])[:, columns])
            if best is None or error < best[1]:
                best = (a, error)
        alphas[name], errors[name] = best
        if best[1] > FLOAT_ABOVE:
            kept[name] = (f"int8 error of its output estimated at {best[1]:.1%} on the calibration text (over "
                          f"{FLOAT_ABOVE:.0%}){f', after smoothing (alpha {best[0]})' if best[0] else ''}")
    return Plan(alphas, errors, kept)


def apply(proto: onnx.ModelProto, statistics: ActivationStatistics, found: dict[str, Fold], chosen: Plan
          ) -> dict[str, np.ndarray]:
    """Fold the chosen smoothing into `proto`, in place; the per-channel scale of each smoothed MatMul's input."""
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}

    def update(name: str, change) -> None:
        weights[name].CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(weights[name]).copy()), name))

    # every scale from the original weights first: a fold changes another MatMul's weight (o_proj's, the V columns
    # of q/k/v; down's, the up columns of gate/up)
    scales = {name: smoothing_scale(statistics.absmax(nodes[name].input[0]),
                                    numpy_helper.to_array(weights[nodes[name].input[1]]), a, found[name])
              for name, a in chosen.alpha.items() if a and name not in chosen.float_kept}
    for name, s in scales.items():
        fold = found[name]
        source = s.reshape(fold.heads)[:, 0, :].reshape(-1) if fold.heads is not None else s

        def divide(t, columns=fold.columns, by=source):
            t[..., columns] /= by
            return t

        update(nodes[name].input[1], lambda w, s=s: w * s[:, None])
        update(fold.tensor, divide)
    return {nodes[name].input[0]: s for name, s in scales.items()}


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
