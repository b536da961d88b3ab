"""`spj-edge quantize`: int8 (static, with calibration; or dynamic) or int4 weights, with ONNX Runtime's own tooling,
behind an accuracy gate against the float32 model.

What makes static int8 work for a decoder LM (and what goes wrong without it):
- Only the MatMuls whose B is a constant weight are quantized (the LM head included): quantizing the attention-score
  and mask path gives infinite scales and garbage text.
- MatMul outputs stay float: ONNX Runtime then fuses Q(x) → DQ → MatMul ← DQ(W) into one MatMulIntegerToFloat, an int8
  GEMM with a float result, instead of dequantizing the weights at every step.
- Calibration feeds prefill steps AND single-token decode steps with the real, growing KV cache of the float model:
  calibrating on prefills with an empty past leaves the decode-time activations out of range. A model with a chat
  template is also calibrated on conversations in it.
- A real LM's outlier channels are smoothed into the weights, and a MatMul whose output static int8 would still
  break (its activations' one scale too coarse: SmolLM2's down_proj) gets 8-bit block weights instead, MatMulNBits
  rounding its activations to int8 per block as it runs, as llama.cpp's Q8_0 does, smoothed for that rounding;
  all decided from the calibration statistics (smoothquant.py). (Kept in float32, SmolLM2-135M's 41 such MatMuls
  read 106 MB a token.)
  On a VNNI CPU every MatMul gets them, in blocks of 128: onnxruntime's block kernel is the faster one there, and
  faster the larger its blocks (exporters/README.md).
- Settings per CPU come from a target profile (exporters/*.json): u8s8, or u8u8 on x86 without VNNI (no saturation).
- int4 calibrates too: the same statistics choose AWQ's scales (folded as SmoothQuant's are), so that the input
  channels that carry the most signal get the finest 4-bit steps; a MatMul whose 4-bit error is estimated too high,
  and the LM head if 4 bits fail the gate, get 8-bit MatMulNBits weights instead. Weights that are block-quantized
  already (a GGUF's, imported) keep their grid, neither scaled nor rounded again (weight_grids.py), but for an 8-bit
  grid where the target's 8-bit blocks are longer than its (kept_grids).
The gate measures held-out bits per byte, top-1 next-token agreement with the float model where it is confident, and
KL, on text calibration did not see; a model that fails it is not written (unless --force).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from tqdm import tqdm

from . import contract, smoothquant, weight_grids
from .artifact import ExportArtifact, open_export, read_json
from .data import calibration_split, read_texts, spaced_windows, tokenize_corpus
from .errors import SPJError
from .metrics import SCORED_WINDOW, Figures, figures, top1_agreement
from .options import CALIBRATION_DECODE, CALIBRATION_PREFILL, QuantizeOptions
from .onnx_lm import OnnxLM, measure_speed
from .runtime.step import unpadded_inputs
from .outputs import check_output, scratch_dir, staged_dir, write_json, write_onnx
from .tables import print_summary
from .tokenizer import save_tokenizer_files, token_byte_lengths

PROFILE_DIRS = (Path(__file__).parent / "exporters", Path(__file__).parent.parent / "exporters")
PERCENTILE = 99.999  # of each smoothed input's calibration sample, with --calibration percentile
PREFILL, DECODE = CALIBRATION_PREFILL, CALIBRATION_DECODE
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
HEAD = "/lm_head/MatMul"
# The most bytes of one MatMulNBits weight (in_column_parts): onnxruntime holds a weight twice while it packs it
WIDEST_WEIGHT = 8 << 20
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulNBits")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    calibration: str
    blockwise_above: float  # static: the estimated int8 error over which a MatMul gets 8-bit block weights
    eight_bit_block_size: int  # weights per scale of 8-bit block weights


def detect_target() -> str:
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        flags = set()
    return "x86-vnni" if flags & {"avx512_vnni", "avx_vnni"} else "x86"


def load_profile(target: str) -> Profile:
    name = detect_target() if target == "auto" else target
    path = next((d / f"{name}.json" for d in PROFILE_DIRS if (d / f"{name}.json").is_file()), None)
    if path is None:
        known = sorted({p.stem for d in PROFILE_DIRS if d.is_dir() for p in d.glob("*.json")})
        raise SPJError(f"--target {target}: no such profile (known: auto, {', '.join(known)})")
    profile = read_json(path)
    return Profile(name=name, description=profile["description"], **profile["quantize"])


# --- the model to quantize ------------------------------------------------------------------------------------------
def float_export(directory: Path) -> ExportArtifact:
    """The float export to quantize, refused before any work if it is foreign, already quantized or has a tokenizer
    that is not its model's."""
    export = open_export(directory)
    inputs = [i.name for i in export.proto.graph.input]
    contract.check_input_names(inputs, str(export.graph_path))
    export.check_contract(inputs)
    if export.metadata.get("spj.quantization", "none") != "none":
        raise SPJError(f"{export.graph_path}: already quantized ({export.metadata['spj.quantization']}); quantize the "
                       "float export")
    export.tokenizer  # loaded and checked against the config now
    return export


def weight_matmuls(proto: onnx.ModelProto) -> list[str]:
    """Nodes worth quantizing: MatMuls whose B is a constant initializer."""
    weights = {i.name for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


# --- text -----------------------------------------------------------------------------------------------------------
def calibration_steps(window: np.ndarray) -> list[np.ndarray]:
    """A calibration sample's steps: a prompt of PREFILL tokens, then one token at a time through the cache."""
    return [window[:PREFILL], *window[PREFILL:, None]]


def calibration_activations(float_lm: OnnxLM, windows: list[np.ndarray], names: list[str]):
    """{name: value} of the tensors `names` (outputs of `float_lm`'s graph besides the contract's) at every
    calibration step, the float model building each sample's cache as it goes: one pass, nothing kept."""
    for window in tqdm(windows, desc="calibration", unit="sample", leave=False):
        step = float_lm.step(1, extra_outputs=names)
        for ids in calibration_steps(window):
            step.extend(ids[None])
            yield step.values(names)


class KVCacheCalibration(CalibrationDataReader):
    """The same steps as feeds for onnxruntime's own calibrator, which only the --op-types experiments run (static
    mode's ranges come from the statistics).

    The float model runs once per sample, step by step, and what is kept is each sample's final cache: a step's
    present is its past with the new positions appended as they are, so the first positions of the final cache are
    every earlier step's past, exactly. Rewinding (each gate attempt) runs nothing again, and memory holds one cache
    a sample (about 24 MB for the `small` preset's 32 samples)."""

    def __init__(self, float_lm: OnnxLM, windows: list[np.ndarray]):
        self.float_lm = float_lm
        self.samples = [(window, self._final_cache(window))
                        for window in tqdm(windows, desc="calibration", unit="sample", leave=False)]
        self.rewind()

    def _final_cache(self, window: np.ndarray) -> list[np.ndarray]:
        step = self.float_lm.step(1)
        for ids in calibration_steps(window)[:-1]:  # the last step's past is all the feeds need
            step.extend(ids[None])
        return step.cache()

    def _feeds(self):
        names = [s.name for s in self.float_lm.inputs]
        for window, cache in self.samples:
            length = 0
            for ids in calibration_steps(window):
                past = [np.ascontiguousarray(c[:, :, :length]) for c in cache]
                yield dict(zip(names, (*unpadded_inputs(ids[None], length), *past)))
                length += len(ids)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):
        self.feeds = self._feeds()


# --- the gate -------------------------------------------------------------------------------------------------------
CONFIDENT_MARGIN = 1.0  # logits: where the float model's first choice leads its second by this, a flip is an error


@dataclass
class Reference:
    """What the gate needs of the float model on the held-out windows, computed once, so that its session can be
    closed before onnxruntime's quantizer loads the model again: its figures, where it is confident, and its
    log-probabilities (float16, a window at a time: 24 windows of a 49,152-word vocabulary are 300 MB so, which
    `scratch` keeps on disk rather than in memory while onnxruntime quantizes)."""
    figures: Figures
    confident: np.ndarray  # per scored position: top-1 leads top-2 by CONFIDENT_MARGIN or more
    log_probs: list[np.ndarray]

    @classmethod
    def of(cls, float_lm: OnnxLM, windows: list[np.ndarray], byte_lengths: np.ndarray,
           scratch: Path | None = None) -> Reference:
        confident, log_probs = [], []

        def scored():
            for i, window in enumerate(windows):
                logits = float_lm.window_logits(window)
                top2 = np.partition(logits[:-1], -2, axis=-1)[:, -2:]  # the positions `figures` scores
                confident.append(top2[:, 1] - top2[:, 0] >= CONFIDENT_MARGIN)
                log_probs.append(_kept(_log_softmax(logits[:-1]).astype(np.float16), scratch, f"reference-{i}.npy"))
                yield window, logits

        reference_figures = figures(scored(), byte_lengths)
        return cls(reference_figures, np.concatenate(confident), log_probs)


def _kept(array: np.ndarray, scratch: Path | None, name: str) -> np.ndarray:
    """`array`, or the same written to `scratch` and mapped back, read when used."""
    if scratch is None:
        return array
    np.save(scratch / name, array)
    return np.lib.format.open_memmap(scratch / name, mode="r")  # a plain array's map: never unpickles


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - np.logaddexp.reduce(x, -1, keepdims=True)


@dataclass
class Comparison:
    """The quantized model against the float one on the same held-out windows."""
    reference: Figures
    candidate: Figures
    confident: np.ndarray
    kl: float  # mean KL(float ‖ quantized) per position, nats


def compare(reference: Reference, candidate: OnnxLM, windows: list[np.ndarray], byte_lengths: np.ndarray
            ) -> Comparison:
    kl = []

    def scored():
        for window, reference_log_probs in zip(windows, reference.log_probs):
            logits = candidate.window_logits(window)
            p = reference_log_probs.astype(np.float64)
            kl.append((np.exp(p) * (p - _log_softmax(logits[:-1]))).sum(-1))
            yield window, logits

    candidate_figures = figures(scored(), byte_lengths)
    return Comparison(reference.figures, candidate_figures, reference.confident, float(np.concatenate(kl).mean()))


def gate_figures(comparison: Comparison) -> dict:
    reference, candidate, confident = comparison.reference, comparison.candidate, comparison.confident
    return {"bits_per_byte_float": float(reference.bits_per_byte), "bits_per_byte": float(candidate.bits_per_byte),
            "bits_per_byte_increase": float(candidate.bits_per_byte / reference.bits_per_byte - 1),
            "top1_agreement": top1_agreement(candidate.top1, reference.top1),
            "top1_agreement_confident": (top1_agreement(candidate.top1[confident], reference.top1[confident])
                                         if confident.any() else 1.0),
            "confident_share": float(confident.mean()), "kl": comparison.kl, "positions": len(reference.top1)}


def gate_failures(figures: dict, max_bpb_increase: float, min_agreement: float) -> list[str]:
    """Agreement counts where the float model is confident: on a real LM a third of the positions are near-ties that
    any rounding flips (SmolLM2-135M: int8 weights alone, no activation rounding, agree on 93 % of all positions and
    on 100 % of the confident ones)."""
    failures = []
    if figures["bits_per_byte_increase"] > max_bpb_increase:
        failures.append(f"bits per byte rose {figures['bits_per_byte_increase']:.2%} "
                        f"({figures['bits_per_byte_float']:.4f} → {figures['bits_per_byte']:.4f}), "
                        f"over the {max_bpb_increase:.2%} allowed (--max-bpb-increase)")
    if figures["top1_agreement_confident"] < min_agreement:
        failures.append(f"top-1 agreement with float32 where it is confident is "
                        f"{figures['top1_agreement_confident']:.2%}, under the {min_agreement:.2%} required "
                        f"(--min-agreement), {min_agreement - figures['top1_agreement_confident']:.2%} short")
    return failures


# --- quantizers -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """The options with the target profile's defaults filled in."""
    options: QuantizeOptions
    profile: Profile
    calibration: str
    per_channel: bool
    eight_bit_block_size: int

    @classmethod
    def of(cls, options: QuantizeOptions) -> Recipe:
        profile = load_profile(options.target)
        return cls(options, profile, options.calibration or profile.calibration,
                   profile.per_channel if options.per_channel is None else options.per_channel,
                   options.int8_block_size or profile.eight_bit_block_size)

    @property
    def mode(self) -> str:
        return self.options.mode


def quantize_graph(source: Path, target: Path, recipe: Recipe, nodes: list[str],
                   calibration: KVCacheCalibration | None, activation_ranges: Path | None,
                   eight_bit: list[str] = (), on_grid: list[str] = ()) -> None:
    """`nodes`: the weight MatMuls to quantize, never empty (onnxruntime reads an empty list as "all of them"), those
    of them in `eight_bit` as 8-bit MatMulNBits (int4, and static int8's MatMuls whose per-tensor activations int8
    would break), those in `on_grid` (int4) on their own grid. Static mode takes its activation ranges from
    `activation_ranges` (onnxruntime's own calibration cache format); without them (the --op-types experiments, which
    quantize more than weight MatMuls) onnxruntime's min/max calibrator runs on the feeds."""
    p, options = recipe.profile, recipe.options
    if recipe.mode == "static":
        static = [n for n in nodes if n not in eight_bit]
        if activation_ranges is None:
            calibration.rewind()
        if static:
            quantize_static(
                str(source), str(target), calibration if activation_ranges is None else None,
                quant_format=QuantFormat.QDQ, op_types_to_quantize=list(options.op_types) if options.op_types else None,
                nodes_to_quantize=static if options.op_types == ("MatMul",) else None,
                per_channel=recipe.per_channel, reduce_range=p.reduce_range,
                activation_type=QUANT_TYPES[p.activation_type], weight_type=QUANT_TYPES[p.weight_type],
                calibrate_method=CalibrationMethod.MinMax,
                calibration_cache_path=activation_ranges and str(activation_ranges),
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"]})  # float out: MatMulIntegerToFloat
        chosen = [n for n in nodes if n in eight_bit]
        if chosen:
            model = block_quantized(onnx.load(str(target if static else source)), chosen, 8, recipe)
            in_column_parts(model)
            onnx.save(model, str(target))
    elif recipe.mode == "dynamic":
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         per_channel=recipe.per_channel, reduce_range=p.reduce_range,
                         weight_type=QUANT_TYPES[p.weight_type], extra_options={"MatMulConstBOnly": True})
    else:
        model = onnx.load(str(source))
        rounded = [n for n in nodes if n not in on_grid]
        for bits, chosen in ((4, [n for n in rounded if n not in eight_bit]), (8, [n for n in rounded if n in eight_bit])):
            if chosen:
                model = block_quantized(model, chosen, bits, recipe)
        weight_grids.write(model, [n for n in nodes if n in on_grid], options.accuracy_level)
        in_column_parts(model)
        onnx.save(model, str(target))


def block_quantized(model: onnx.ModelProto, chosen: list[str], bits: int, recipe: Recipe) -> onnx.ModelProto:
    """The weight MatMuls `chosen` as MatMulNBits: symmetric `bits`-bit weights with a scale per block of
    --block-size inputs (4 bits) or of the recipe's eight_bit_block_size (8 bits), computed at --accuracy-level (4: the
    activations rounded to int8 per block as the kernel runs, as llama.cpp's Q8_0 does). A MatMul with fewer inputs
    than an 8-bit block gets the power of two that holds them: a larger block would only pad."""
    options = recipe.options
    if bits == 4:
        sizes = dict.fromkeys(chosen, options.block_size)
    else:
        weights = {i.name: i for i in model.graph.initializer}
        inputs = {n.name: weights[n.input[1]].dims[0] for n in model.graph.node if n.name in chosen}
        sizes = {n: min(recipe.eight_bit_block_size, max(16, 1 << (inputs[n] - 1).bit_length())) for n in chosen}
    for size in sorted(set(sizes.values())):
        # its nodes_to_include is not honoured (onnxruntime 1.32): say what to leave out instead
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=size, is_symmetric=True,
                                         accuracy_level=options.accuracy_level,
                                         nodes_to_exclude=[n for n in weight_matmuls(model) if sizes.get(n) != size])
        quantizer.process()
        model = quantizer.model.model
    return model


def in_column_parts(model: onnx.ModelProto, widest: int = WIDEST_WEIGHT) -> None:
    """Each MatMulNBits whose weight holds more than `widest` bytes as MatMulNBits over equal parts of its output
    columns, joined by a Concat, in place. onnxruntime maps a weight from the file, packs it into memory of its own, and
    unmaps it once packed: while loading, the largest weight is in memory twice, and an LM head (a third of
    SmolLM2-135M's int4, packed last) sets the process's peak: 244 MB, 220 in four parts, decoding as fast. Each output
    column is its own sum over the same blocks, so the parts compute what the whole did."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "MatMulNBits"]:
        size = int(np.prod(weights[node.input[1]].dims))  # uint8
        if size <= widest:
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        columns = attributes["N"]
        parts = -(-columns // max(1, widest // (size // columns)))  # of whole columns, each within `widest`
        width = -(-columns // parts)
        # by output column: the weight, its scales and zero points, a bias (inputs 1, 2, 3, 5; 4, g_idx, is by input)
        by_column = {i: onnx.numpy_helper.to_array(weights[name]) for i, name in enumerate(node.input)
                     if i in (1, 2, 3, 5) and name}
        replacement, outputs = [], []
        for start in range(0, columns, width):
            stop = min(start + width, columns)
            inputs = list(node.input)
            for i, value in by_column.items():
                part = value.reshape(columns, -1)[start:stop].reshape(-1, *value.shape[1:])
                inputs[i] = f"{node.input[i]}.columns_{start}"
                graph.initializer.append(onnx.numpy_helper.from_array(part, inputs[i]))
            outputs.append(f"{node.name}/columns_{start}/MatMulNBits_output_0")
            replacement.append(onnx.helper.make_node("MatMulNBits", inputs, [outputs[-1]], domain="com.microsoft",
                                                     name=f"{node.name}/columns_{start}/MatMulNBits",
                                                     **{**attributes, "N": stop - start}))
        replacement.append(onnx.helper.make_node("Concat", outputs, list(node.output), name=f"{node.name}/Concat",
                                                 axis=-1))
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(index + offset, new)
        for i in by_column:
            if not any(node.input[i] in n.input for n in graph.node):
                graph.initializer.remove(weights[node.input[i]])


def quantize_embedding(path: Path) -> bool:
    """The embedding table as int8 rows with one scale per row, in place. Size, not speed: a Gather reads one row a
    token, so the table is the largest tensor left in float (a quarter of `small`) yet costs nothing per step. The
    gathered rows are dequantized by a Cast and a Mul with their gathered scales."""
    proto = onnx.load(str(path))
    initializers = {i.name: i for i in proto.graph.initializer}
    gather = next((n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in initializers
                   and n.input[1] == "input_ids"), None)
    if gather is None:
        return False
    table = onnx.numpy_helper.to_array(initializers[gather.input[0]])
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127
    quantized = np.round(table / scale).astype(np.int8)
    name, scope = gather.input[0], gather.name.rsplit("/", 1)[0]
    proto.graph.initializer.remove(initializers[name])
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(quantized, f"{name}.int8"),
                                    onnx.numpy_helper.from_array(scale.astype(np.float32), f"{name}.scale")])
    rows, row_scales = f"{scope}/Gather_int8_output_0", f"{scope}/Gather_scale_output_0"
    index = list(proto.graph.node).index(gather)
    replacement = [
        onnx.helper.make_node("Gather", [f"{name}.int8", "input_ids"], [rows], name=f"{scope}/Gather_int8"),
        onnx.helper.make_node("Cast", [rows], [f"{rows}_float"], name=f"{scope}/Cast", to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Gather", [f"{name}.scale", "input_ids"], [row_scales], name=f"{scope}/Gather_scale"),
        onnx.helper.make_node("Mul", [f"{rows}_float", row_scales], list(gather.output), name=f"{scope}/Mul"),
    ]
    proto.graph.node.remove(gather)
    for offset, node in enumerate(replacement):
        proto.graph.node.insert(index + offset, node)
    onnx.save(proto, str(path))
    return True


@contextlib.contextmanager
def quiet_onnxruntime():
    """One progress line per attempt and one summary, not onnxruntime's: importing its int4 quantizer sets the root
    logger to INFO (hundreds of per-node lines), dynamic mode warns once per tensor that it has no parameters, and
    the calibrators print progress on stdout."""
    root, saved = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(saved)


@contextlib.contextmanager
def tempfiles_in(directory: Path):
    """onnxruntime's quantizer writes its own copies of the model to tempfile's default folder: send them into our
    scratch folder, so that a killed run leaves them where the next run removes them, not in TMPDIR."""
    saved, tempfile.tempdir = tempfile.tempdir, str(directory)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def executed_ops(path: Path) -> dict:
    """What ONNX Runtime actually runs after its own graph fusions: the integer kernels and any MatMul still in float."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_name(f"{path.stem}.optimized.onnx"))
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    weights = {i.name for i in optimized.graph.initializer}
    counts = {}
    for node in optimized.graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    float_weight = [n.name for n in optimized.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    return {"integer_ops": counts, "float_weight_matmuls": float_weight}


def exposing(proto: onnx.ModelProto, tensors: list[str], config) -> OnnxLM:
    """A driver for `proto` whose outputs also include the intermediate `tensors`."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(proto)
    known = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in known)
    return OnnxLM(exposed.SerializeToString(), config)


def sensitivity_order(float_model: ExportArtifact, quantized: Path, window: np.ndarray) -> list[str]:
    """Weight MatMuls by the relative error of their outputs against the float model, worst first: the order in
    which --auto-exclude keeps them in float. Quantizers keep each output's tensor name, so outputs pair by name."""
    matmuls = set(weight_matmuls(float_model.proto))
    tensors = {n.output[0]: n.name for n in float_model.proto.graph.node if n.name in matmuls}

    def values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        names = [t for t in tensors if t in {o for n in proto.graph.node for o in n.output}]
        step = exposing(proto, names, float_model.config).step(1, extra_outputs=names)
        step.extend(window[None])
        return step.values(names)

    reference, candidate = values(float_model.proto), values(onnx.load(str(quantized)))
    error = {tensors[t]: float(np.linalg.norm(candidate[t] - reference[t]) / (np.linalg.norm(reference[t]) + 1e-12))
             for t in reference if t in candidate}
    return sorted(error, key=error.get, reverse=True)


# --- the stage ------------------------------------------------------------------------------------------------------
def quantize(model_dir: str | Path = "runs/onnx", out: str | Path | None = None, *, calib: list | None = None,
             eval_data: list | None = None, options: QuantizeOptions = QuantizeOptions(),
             overwrite: bool = False) -> dict:
    """Quantize the float export in `model_dir` into `out`, calibrated on `calib` (static mode) and gated on held-out
    text: `eval_data`, else the tail of each `calib` file."""
    if not calib and not eval_data:
        raise SPJError("no text given: pass --calib DIR (static mode calibrates on it; every mode measures its gate "
                       "on held-out text from it or from --eval)")
    recipe = Recipe.of(options)
    model_dir = Path(model_dir)
    out = Path(out if out is not None else ("runs/int4" if options.mode == "int4" else "runs/int8"))
    check_output(out, [model_dir, *(calib or []), *(eval_data or [])], overwrite=overwrite)
    float_model = float_export(model_dir)
    unknown = [n for n in options.exclude if n not in weight_matmuls(float_model.proto)]
    if unknown:
        raise SPJError(f"--exclude {unknown[0]}: no such weight MatMul (e.g. /lm_head/MatMul, "
                       f"/layers.0/mlp/down_proj/MatMul)")
    started = time.perf_counter()
    calib_set, eval_set = prepare_text(float_model, calib or [], eval_data, options)
    with scratch_dir(out) as tmp, tempfiles_in(tmp):
        outcome = gated_attempts(float_model, calib_set, eval_set, recipe, tmp)
        if outcome.failures and not options.force:
            raise SPJError(f"{options.mode} quantization failed the accuracy gate: {'; '.join(outcome.failures)}; "
                           "nothing written (--auto-exclude keeps the most sensitive layers in float, --force writes "
                           "it anyway)")
        candidate = outcome.path
        stamp(candidate, float_model, recipe)
        executed = executed_ops(candidate)
        speed = {}
        if options.measure:
            for threads in (1, 2):
                speed[threads] = measure_speed({"float32": float_model.graph_path, options.mode: candidate},
                                               float_model.config, threads=threads)
        report = build_report(model_dir, float_model, recipe, len(calib_set), outcome, executed, speed, len(eval_set),
                              time.perf_counter() - started)
        with staged_dir(out) as staged:
            write_onnx(onnx.load(str(candidate)), staged / "model.onnx", options.external_data)
            save_tokenizer_files(float_model.tokenizer, staged)
            write_json(staged / "config.json", float_model.config.to_hf_dict())
            write_json(staged / "report.json", report)
    if outcome.failures:
        print(f"spj-edge: warning: {out} failed the accuracy gate and was written anyway (--force): "
              f"{'; '.join(outcome.failures)}")
    print_report(report, model_dir, out)
    return report


def prepare_text(float_model: ExportArtifact, calib: list, eval_data: list | None,
                 options: QuantizeOptions) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Calibration windows (static mode), and held-out windows for the gate that calibration never sees."""
    tokenizer, context = float_model.tokenizer, float_model.config.max_position_embeddings
    calib_stream, held_out = calibration_split(calib, tokenizer) if calib else (np.zeros(0, np.int64), None)
    if eval_data:
        held_out = tokenize_corpus(list(read_texts(eval_data).values()), tokenizer)
    eval_set = spaced_windows(held_out, min(SCORED_WINDOW, context), options.eval_windows)
    if not eval_set:
        raise SPJError(f"{', '.join(map(str, eval_data or calib))}: too little held-out text for the accuracy gate "
                       f"(need at least {SCORED_WINDOW} tokens)")
    if options.mode == "dynamic":
        return [], eval_set
    calib_set = spaced_windows(calib_stream, min(PREFILL + DECODE, context), options.calib_samples)
    if len(calib_set) < min(4, options.calib_samples):
        raise SPJError(f"{', '.join(map(str, calib)) or 'no --calib'}: too little text to calibrate "
                       f"({len(calib_stream)} tokens; need {4 * (PREFILL + DECODE)} or more)")
    return calib_set + chat_windows(tokenizer, calib, min(PREFILL + DECODE, context), options.calib_samples // 4), eval_set


def chat_windows(tokenizer, calib: list, length: int, count: int) -> list[np.ndarray]:
    """Calibration in the model's own chat format, where it has one: conversations (a user turn and a reply, from the
    first half of the --calib files, the part no stage holds out) as its template renders them. Its special tokens
    and system prompt have activations plain text never shows, and ranges that leave them out send a chat astray
    (SmolLM2-135M answered "What is the capital of France?" with "L'Étoile, la maire, ..." until these were in)."""
    if tokenizer.chat_template is None or count == 0:
        return []
    paragraphs = [p.strip() for text in read_texts(calib).values()
                  for p in text[:len(text) // 2].split("\n\n") if p.strip()]
    picks = np.linspace(0, len(paragraphs) - 2, num=min(count, max(len(paragraphs) - 1, 0))).astype(int)
    windows = []
    for i in np.unique(picks):
        ids = tokenizer.encode_chat([{"role": "user", "content": paragraphs[i]},
                                     {"role": "assistant", "content": paragraphs[i + 1]}], context=1 << 20,
                                    add_generation_prompt=False)
        if len(ids) >= length:
            windows.append(np.array(ids[:length], np.int64))
    return windows


def statistics_inputs(recipe: Recipe, proto: onnx.ModelProto) -> list[str]:
    """The tensors the calibration statistics of static int8 and int4 read: every weight MatMul's input."""
    if recipe.mode == "dynamic" or recipe.options.op_types != ("MatMul",):
        return []
    matmuls = set(weight_matmuls(proto))
    return list(dict.fromkeys(n.input[0] for n in proto.graph.node if n.name in matmuls))


def float_reference(float_model: ExportArtifact, recipe: Recipe, tmp: Path) -> OnnxLM:
    """The float model that the statistics (or the experiments' calibrator) and the gate all run: one onnxruntime
    session, so that a real model's weights are not held in a second one. For static int8 and int4 its graph also
    outputs the tensors the statistics read (added to the parsed graph and taken off again: a copy of the graph would
    be another copy of the weights)."""
    outputs = float_model.proto.graph.output
    contract_outputs, path = len(outputs), float_model.graph_path
    inputs = statistics_inputs(recipe, float_model.proto)
    if inputs:
        outputs.extend(onnx.ValueInfoProto(name=t) for t in inputs)
        path = tmp / "float_with_statistics.onnx"
        write_onnx(float_model.proto, path)  # past 1 GiB its weights go beside it, so the parse is forgotten next
        del outputs[contract_outputs:]
    return OnnxLM(path, float_model.config)


@dataclass
class Outcome:
    """The last attempt: its graph, its gate figures and failures, and what it kept in float."""
    path: Path
    figures: dict
    failures: list[str]
    excluded: dict[str, str]  # node → why
    quantized: list[str]
    plan: smoothquant.Plan | None  # static and int4 with calibration: scaling per MatMul, estimated errors
    eight_bit: dict[str, str]  # int4: the MatMuls given 8-bit weights, and why
    on_grid: dict[str, int]  # int4: the MatMuls written on the block grid their weights were on, and its bits


def kept_grids(grids: dict[str, int], recipe: Recipe) -> tuple[dict[str, int], dict[str, str]]:
    """Of the int4 MatMuls whose weights are on a block grid already (weight_grids.find_all: name → bits), those
    that keep it, and those that go into the target's 8-bit blocks instead (name → why): an 8-bit grid (a GGUF's
    Q8_0, in blocks of 32) where the target's 8-bit blocks are longer. Rounded again into them it loses next to
    nothing, and onnxruntime's kernel runs longer blocks faster: SmolLM2-135M's Q8_0 LM head (a third of the bytes a
    token reads) in blocks of 128 makes its int4 decode 1.12-1.19x as fast at 1 thread (three interleaved runs), bits
    per byte +0.12 → +0.15 %. A 4-bit grid is always kept: rounded again onto another, SmolLM2's lose 5 %."""
    size = recipe.eight_bit_block_size
    regridded = {name: f"its weights' 8-bit grid (blocks of {weight_grids.BLOCK}) rounded again into the target's "
                       f"8-bit blocks of {size}, which onnxruntime runs faster"
                 for name, bits in grids.items() if bits == 8 and size > weight_grids.BLOCK}
    return {name: bits for name, bits in grids.items() if name not in regridded}, regridded


def scaling_plan(float_model: ExportArtifact, statistics: smoothquant.ActivationStatistics, recipe: Recipe,
                 matmuls: list[str], tmp: Path, on_grid: Collection[str] = (), eight_bit: dict[str, str] | None = None
                 ) -> tuple[smoothquant.Plan, Path, Path | None]:
    """The calibration statistics decide each MatMul's scaling (SmoothQuant for static int8, AWQ for int4) and what
    is kept at a higher precision (smoothquant.py); `eight_bit` (name → why) goes into 8-bit blocks whatever they
    say. Returns the plan, the scaled graph and, for static int8, the activation ranges as onnxruntime's calibration
    cache. The scaling is folded into the export's parsed graph itself, which is let go of once written (weights as
    external data, a tensor at a time)."""
    static = recipe.mode == "static"
    mode = smoothquant.static(recipe.profile.blockwise_above) if static else smoothquant.int4(recipe.options.block_size)
    proto = float_model.proto
    nodes = {n.name: n for n in proto.graph.node}
    found = smoothquant.folds(proto, float_model.config)
    plan = smoothquant.plan(proto, statistics, found, matmuls, mode, recipe.options.smoothquant, exact=on_grid)
    plan.kept.update(eight_bit or {})
    if plan.kept:  # what goes into 8-bit blocks is scaled for them (their estimates stay those of `mode`)
        blocks = smoothquant.plan(proto, statistics, found, list(plan.kept),
                                  smoothquant.eight_bit_blocks(recipe.eight_bit_block_size), recipe.options.smoothquant,
                                  exact=on_grid)
        plan.alpha.update(blocks.alpha)
        plan.scales.update(blocks.scales)
        for name in set(plan.kept) - set(blocks.scales):
            plan.scales.pop(name, None)
    scales = smoothquant.apply(proto, found, plan, matmuls)
    scaled = tmp / "scaled.onnx"
    onnx.save(proto, str(scaled), save_as_external_data=True, location=f"{scaled.name}.data")
    float_model.forget_graph()  # its weights are the scaled ones now
    if not static:
        return plan, scaled, None
    low_high = smoothquant.ranges(statistics, scales, [nodes[m].input[0] for m in matmuls if m not in plan.kept],
                                  PERCENTILE if recipe.calibration == "percentile" else None)
    cache = tmp / "activation_ranges.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
        for name, (low, high) in low_high.items()}), cache)
    return plan, scaled, cache


def gated_attempts(float_model: ExportArtifact, calib_set: list[np.ndarray], eval_set: list[np.ndarray],
                   recipe: Recipe, tmp: Path) -> Outcome:
    """Quantize and measure the gate. Static mode first smooths and keeps in float what its calibration statistics
    say int8 would break. While the gate fails: an int4 LM head goes back to float, then (--auto-exclude) the MatMuls
    whose outputs moved most in one forward pass, doubling their number each time. Each attempt prints its figures.

    What is held when: the float session (and the export's parsed graph until it is saved with the statistics
    outputs) while the gate's reference and the statistics are computed; then the statistics and the smoothed graph;
    then only what onnxruntime's quantizer holds, and one quantized session at a time for the gate."""
    options, cfg = recipe.options, float_model.config
    byte_lengths = token_byte_lengths(float_model.tokenizer, cfg.vocab_size)
    matmuls = weight_matmuls(float_model.proto)
    on_grid, regridded = kept_grids(weight_grids.find_all(float_model.proto, matmuls)
                                    if recipe.mode == "int4" and options.keep_grids else {}, recipe)
    inputs = statistics_inputs(recipe, float_model.proto)
    source, plan, activation_ranges, calibration, statistics = float_model.graph_path, None, None, None, None
    float_lm = float_reference(float_model, recipe, tmp)
    float_model.forget_graph()
    reference = Reference.of(float_lm, eval_set, byte_lengths, tmp)
    if inputs:
        statistics = smoothquant.ActivationStatistics.collect(
            calibration_activations(float_lm, calib_set, inputs), inputs, tokens=sum(map(len, calib_set)))
    elif recipe.mode == "static":
        calibration = KVCacheCalibration(float_lm, calib_set)
    del float_lm
    if statistics is not None:
        plan, source, activation_ranges = scaling_plan(float_model, statistics, recipe, matmuls, tmp, on_grid,
                                                       regridded)
        del statistics
    eight_bit = dict(plan.kept) if plan else dict(regridded)
    candidate = tmp / "model.onnx"
    attempts = 0

    def attempt(excluded: dict) -> Outcome:
        nonlocal attempts
        nodes = [n for n in matmuls if n not in excluded]
        if nodes:
            with quiet_onnxruntime():
                quantize_graph(source, candidate, recipe, nodes, calibration, activation_ranges, list(eight_bit),
                               list(on_grid))
        else:  # nothing left to quantize but the embedding: onnxruntime would read an empty list as "everything"
            onnx.save(onnx.load(str(source)), str(candidate))  # the smoothed graph's weights are external
        quantize_embedding(candidate)
        figures = gate_figures(compare(reference, OnnxLM(candidate, cfg), eval_set, byte_lengths))
        failures = gate_failures(figures, options.max_bpb_increase, options.min_agreement)
        attempts += 1
        tqdm.write(f"quantize: attempt {attempts}: {len(nodes)} of {len(matmuls)} MatMuls in {recipe.mode}, bits per "
                   f"byte {figures['bits_per_byte_increase']:+.2%}, top-1 agreement "
                   f"{figures['top1_agreement_confident']:.2%} where float32 is confident "
                   f"({figures['top1_agreement']:.2%} overall), KL {figures['kl']:.4f}: "
                   f"{'fails the gate' if failures else 'passes'}")
        return Outcome(candidate, figures, failures, excluded, nodes, plan, dict(eight_bit),
                       {n: bits for n, bits in on_grid.items() if n in nodes})

    outcome = attempt({n: "excluded by --exclude" for n in options.exclude})
    if (outcome.failures and options.mode == "int4" and HEAD in outcome.quantized
            and HEAD not in eight_bit and HEAD not in on_grid):
        eight_bit[HEAD] = "a 4-bit LM head broke the accuracy gate"
        outcome = attempt(outcome.excluded)
    if outcome.failures and options.auto_exclude:
        order = [n for n in sensitivity_order(float_model, candidate, eval_set[0]) if n not in outcome.excluded]
        kept, count = outcome.excluded, 1
        while order:
            outcome = attempt({**kept, **{n: "kept in float by --auto-exclude (most sensitive)" for n in order[:count]}})
            if not outcome.failures or count == len(order):
                break
            count = min(2 * count, len(order))
    return outcome


def stamp(path: Path, float_model: ExportArtifact, recipe: Recipe) -> None:
    """The float model's metadata on the quantized graph, with the quantization's mode and target."""
    quantized = onnx.load(str(path))
    del quantized.metadata_props[:]
    meta = {**float_model.metadata, "spj.quantization": recipe.mode, "spj.quantization_target": recipe.profile.name}
    for key, value in meta.items():
        quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(path))


def build_report(model_dir: Path, float_model: ExportArtifact, recipe: Recipe, calibration_samples: int,
                 outcome: Outcome, executed: dict, speed: dict,
                 heldout_windows: int, elapsed_s: float) -> dict:
    options, profile, mode = recipe.options, recipe.profile, recipe.mode
    report = {
        "stage": "quantize", "mode": mode, "source": str(model_dir), "target": profile.name,
        "target_description": profile.description,
        "settings": {"calibration": recipe.calibration if mode == "static" else None,
                     "per_channel": recipe.per_channel, "reduce_range": profile.reduce_range,
                     "activation_type": profile.activation_type if mode == "static" else None,
                     "weight_type": "int4" if mode == "int4" else profile.weight_type,
                     "block_size": options.block_size if mode == "int4" else None,
                     "eight_bit_block_size": recipe.eight_bit_block_size if outcome.eight_bit else None,
                     "accuracy_level": options.accuracy_level if mode == "int4" or outcome.eight_bit else None,
                     "calibration_samples": calibration_samples,
                     "scaling": None if mode == "dynamic" else (
                         f"{'AWQ' if mode == 'int4' else 'SmoothQuant'}, alpha "
                         f"{options.smoothquant if options.smoothquant is not None else 'per MatMul, from the statistics'}"),
                     "calibration_feeds": (f"per sample, a prefill of {PREFILL} tokens then {DECODE} cached decode "
                                           "steps" if calibration_samples else None)},
        "quantized": outcome.quantized,
        "smoothing": ({n: a for n, a in outcome.plan.alpha.items() if a and n not in outcome.excluded}
                      if outcome.plan else {}),
        f"estimated_{'int4' if mode == 'int4' else 'int8'}_error": (
            {n: round(e, 5) for n, e in outcome.plan.error.items()} if outcome.plan else {}),
        "eight_bit": outcome.eight_bit,
        "on_grid": outcome.on_grid,
        "embedding": "int8 rows with a float scale per row (for size: a Gather reads one row a token)",
        "excluded": {**outcome.excluded, "(everything but weight MatMuls and the embedding)": "attention scores, "
                     "masks and norms gain nothing from int8 and break when quantized"},
        "executed": executed,
        "gate": {**outcome.figures, "confident_margin": CONFIDENT_MARGIN, "max_bpb_increase": options.max_bpb_increase,
                 "min_agreement": options.min_agreement, "passed": not outcome.failures,
                 "failures": outcome.failures, "heldout_windows": heldout_windows},
        "file_bytes": {"float32": float_model.file_bytes, mode: outcome.path.stat().st_size},
        "speed": {f"threads_{t}": s for t, s in speed.items()},
        "elapsed_s": round(elapsed_s, 1),
    }
    if speed:
        best = max(speed, key=lambda t: speed[t][mode]["decode_tokens_per_s"])
        report["best_threads"] = best
        report["decode_speedup"] = (speed[best][mode]["decode_tokens_per_s"]
                                    / max(s["float32"]["decode_tokens_per_s"] for s in speed.values()))
    return report


def print_report(report: dict, model_dir: Path, out: Path) -> None:
    mode, sizes, figures = report["mode"], report["file_bytes"], report["gate"]
    kept = [n for n in report["excluded"] if n.startswith("/")]
    rows = [("mode", f"{mode} ({report['target']})"), ("file", f"{sizes[mode] / 1e6:.2f} MB "
            f"({sizes[mode] / sizes['float32']:.0%} of float32)"),
            ("bits/byte", f"{figures['bits_per_byte']:.4f} vs {figures['bits_per_byte_float']:.4f} "
             f"({figures['bits_per_byte_increase']:+.2%})"),
            ("top-1 agreement", f"{figures['top1_agreement_confident']:.2%} where float32 is confident "
             f"({figures['confident_share']:.0%} of {figures['positions']}), {figures['top1_agreement']:.2%} overall"),
            ("KL(float32 ‖ quantized)", f"{figures['kl']:.4f} nats a token"),
            ("integer kernels", json.dumps(report["executed"]["integer_ops"])), ("kept in float", len(kept))]
    if report["on_grid"]:
        bits = sorted(set(report["on_grid"].values()))
        rows.append(("kept on their grid", f"{len(report['on_grid'])} MatMuls, their weights block-quantized already "
                     f"({' and '.join(f'{b}-bit' for b in bits)})"))
    if report["eight_bit"]:
        kinds = Counter(name.split("/")[-2] for name in report["eight_bit"])  # /layers.3/mlp/down_proj/MatMul
        rows.append(("8-bit block weights", f"{len(report['eight_bit'])} MatMuls (" + ", ".join(
            f"{kind} ×{count}" for kind, count in kinds.items()) + "; report.json names each and why)"))
    if report["speed"]:
        best = report["speed"][f"threads_{report['best_threads']}"]
        rows.append(("decode tokens/s", f"{best[mode]['decode_tokens_per_s']:.0f} vs float32 "
                     f"{best['float32']['decode_tokens_per_s']:.0f} ({report['best_threads']} threads)"))
    print_summary(f"quantize: {model_dir} → {out / 'model.onnx'}", rows)
