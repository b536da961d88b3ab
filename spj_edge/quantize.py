"""`spj-edge quantize`: int8 (static, with calibration; or dynamic) or int4 weights, with ONNX Runtime's own tooling,
behind an accuracy gate against the float32 model.

What makes static int8 work for a decoder LM (and what goes wrong without it):
- Only the MatMuls whose B is a constant weight are quantized (the LM head included): quantizing the attention-score
  and mask path gives infinite scales and garbage text.
- MatMul outputs stay float: ONNX Runtime then fuses Q(x) → DQ → MatMul ← DQ(W) into one MatMulIntegerToFloat, an int8
  GEMM with a float result, instead of dequantizing the weights at every step.
- Calibration feeds prefill steps AND single-token decode steps with the real, growing KV cache of the float model:
  calibrating on prefills with an empty past leaves the decode-time activations out of range.
- Settings per CPU come from a target profile (exporters/*.json): u8s8 everywhere, 7-bit weights on x86 without VNNI.
The gate measures held-out bits per byte and top-1 next-token agreement with the float model on text calibration did
not see; a model that fails it is not written (unless --force).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
from onnxruntime.quantization.shape_inference import quant_pre_process
from tqdm import tqdm

from . import contract
from .data import read_texts, spaced_windows
from .errors import SPJError
from .evaluate import Figures, figures
from .model import SPJConfig
from .onnx_lm import OnnxLM, measure_speed
from .outputs import check_output, print_summary, read_json, read_onnx, scratch_dir, staged_dir, write_json
from .tokenizer import check_matches_model, load_tokenizer, save_tokenizer, token_byte_lengths

MODES = ("static", "dynamic", "int4")
PROFILE_DIRS = (Path(__file__).parent / "exporters", Path(__file__).parent.parent / "exporters")
CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulNBits")
PREFILL, DECODE = 32, 16  # tokens per calibration sample: a prompt, then single-token steps through the cache
EVAL_WINDOW = 128


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    activation_type: str
    weight_type: str
    per_channel: bool
    reduce_range: bool
    calibration: str


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
@dataclass
class FloatModel:
    directory: Path
    path: Path
    proto: onnx.ModelProto
    config: SPJConfig
    tokenizer: object

    @property
    def weight_matmuls(self) -> list[str]:
        """Nodes worth quantizing: MatMuls whose B is a constant initializer."""
        weights = {i.name for i in self.proto.graph.initializer}
        return [n.name for n in self.proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def load_float_model(directory: Path) -> FloatModel:
    path = directory / "model.onnx"
    _, proto = read_onnx(directory)
    config = SPJConfig.from_hf_dict(read_json(directory / "config.json"), source=str(directory / "config.json"))
    contract.check_inputs([i.name for i in proto.graph.input], config.num_hidden_layers, config.num_key_value_heads,
                          config.head_dim, str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("spj.quantization", "none") != "none":
        raise SPJError(f"{path}: already quantized ({meta['spj.quantization']}); quantize the float export")
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    check_matches_model(tokenizer, config.vocab_size, str(directory / "tokenizer.json"))
    return FloatModel(directory, path, proto, config, tokenizer)


# --- text -----------------------------------------------------------------------------------------------------------
def token_streams(paths: list, tokenizer, held_out_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Each file's tokens split into a head (calibration) and a tail (the gate's held-out text)."""
    heads, tails = [], []
    for text in read_texts(paths).values():
        ids = np.array(tokenizer.encode(text, add_special_tokens=False).ids, np.int64)
        cut = int(len(ids) * (1 - held_out_fraction))
        heads.append(ids[:cut])
        tails.append(ids[cut:])
    return np.concatenate(heads), np.concatenate(tails)


class KVCacheCalibration(CalibrationDataReader):
    """Feeds for the calibrator: each sample is a prefill of `prefill` tokens on an empty past followed by
    single-token decode steps whose past is the real cache the float model produced. Feeds are made lazily, so memory
    holds one cache at a time."""

    def __init__(self, float_lm: OnnxLM, windows: list[np.ndarray], prefill: int = PREFILL):
        self.float_lm, self.windows, self.prefill = float_lm, windows, prefill
        self.feeds = self._generate()

    def _generate(self):
        lm = self.float_lm
        for window in tqdm(self.windows, desc="calibration", unit="sample", leave=False):
            past = lm.empty_past(1)
            for ids in [window[:self.prefill], *window[self.prefill:, None]]:  # a prompt, then one token at a time
                inputs = lm.step_inputs(ids[None], past)
                yield lm.feed(*inputs, past)
                _, past = lm(*inputs, past)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):
        self.feeds = self._generate()


# --- the gate -------------------------------------------------------------------------------------------------------
def heldout_figures(lm: OnnxLM, windows: list[np.ndarray], byte_lengths: np.ndarray) -> Figures:
    return figures(((window, lm.window_logits(window)) for window in windows), byte_lengths)


def gate_figures(reference: Figures, candidate: Figures) -> dict:
    return {"bits_per_byte_float": float(reference.bits_per_byte), "bits_per_byte": float(candidate.bits_per_byte),
            "bits_per_byte_increase": float(candidate.bits_per_byte / reference.bits_per_byte - 1),
            "top1_agreement": float((reference.top1 == candidate.top1).mean()), "positions": len(reference.top1)}


def gate_failures(figures: dict, max_bpb_increase: float, min_agreement: float) -> list[str]:
    failures = []
    if figures["bits_per_byte_increase"] > max_bpb_increase:
        failures.append(f"bits per byte rose {figures['bits_per_byte_increase']:.2%} "
                        f"({figures['bits_per_byte_float']:.4f} → {figures['bits_per_byte']:.4f}), "
                        f"over the {max_bpb_increase:.2%} allowed (--max-bpb-increase)")
    if figures["top1_agreement"] < min_agreement:
        failures.append(f"top-1 agreement with float32 is {figures['top1_agreement']:.2%}, under the "
                        f"{min_agreement:.2%} required (--min-agreement), {min_agreement - figures['top1_agreement']:.2%}"
                        " short")
    return failures


# --- quantizers -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    mode: str
    profile: Profile
    calibration: str
    per_channel: bool
    calib_samples: int
    block_size: int
    accuracy_level: int
    op_types: tuple[str, ...] | None = ("MatMul",)  # None: every type ORT can quantize, the recipe known to fail


def quantize_graph(source: Path, target: Path, float_model: FloatModel, settings: Settings, nodes: list[str],
                   calibration: KVCacheCalibration | None) -> None:
    p = settings.profile
    if settings.mode == "static":
        calibration.rewind()
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrators print their progress on stdout
            quantize_static(
                str(source), str(target), calibration, quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(settings.op_types) if settings.op_types else None,
                nodes_to_quantize=nodes if settings.op_types == ("MatMul",) else None,
                per_channel=settings.per_channel, reduce_range=p.reduce_range,
                activation_type=QUANT_TYPES[p.activation_type], weight_type=QUANT_TYPES[p.weight_type],
                calibrate_method=CALIBRATIONS[settings.calibration],
                extra_options={"OpTypesToExcludeOutputQuantization": ["MatMul"],  # float out: MatMulIntegerToFloat
                               "CalibMaxIntermediateOutputs": 64,  # bounds the calibrator's memory
                               "CalibPercentile": 99.999})
    elif settings.mode == "dynamic":
        quantize_dynamic(str(source), str(target), op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes,
                         per_channel=settings.per_channel, reduce_range=p.reduce_range,
                         weight_type=QUANT_TYPES[p.weight_type], extra_options={"MatMulConstBOnly": True})
    else:
        model = onnx.load(str(source))
        excluded = [n for n in float_model.weight_matmuls if n not in nodes]
        quantizer = MatMulNBitsQuantizer(model, block_size=settings.block_size, is_symmetric=True,
                                         accuracy_level=settings.accuracy_level, nodes_to_exclude=excluded)
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


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


def sensitivity_order(float_model: FloatModel, quantized: Path, window: np.ndarray) -> list[str]:
    """Weight MatMuls by the relative error of their outputs against the float model, worst first: the order in
    which --auto-exclude keeps them in float. Quantizers keep each output's tensor name, so outputs pair by name."""
    tensors = {n.output[0]: n.name for n in float_model.proto.graph.node if n.name in float_model.weight_matmuls}

    def values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
        names = [t for t in tensors if t in {o for n in proto.graph.node for o in n.output}]
        lm = exposing(proto, names, float_model.config)
        past = lm.empty_past(1)
        return dict(zip(names, lm.session.run(names, lm.feed(*lm.step_inputs(window[None], past), past))))

    reference, candidate = values(float_model.proto), values(onnx.load(str(quantized)))
    error = {tensors[t]: float(np.linalg.norm(candidate[t] - reference[t]) / (np.linalg.norm(reference[t]) + 1e-12))
             for t in reference if t in candidate}
    return sorted(error, key=error.get, reverse=True)


def smooth(proto: onnx.ModelProto, config, calibration: KVCacheCalibration, alpha: float) -> list[str]:
    """SmoothQuant's scale folding, in place: for each weight MatMul fed only by an RMSNorm, divide the norm's gamma
    by s and multiply the weight's matching rows by s, s_j = max|x_j|^α / max|W_j|^(1-α). The function is unchanged,
    but activation outliers move into the weights, where per-channel scales absorb them. Returns the weights scaled."""
    graph = proto.graph
    initializers = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    pairs = []  # (gamma, weight, activation)
    for node in graph.node:
        norm = producer.get(node.input[0]) if node.op_type == "MatMul" else None
        if (norm is not None and node.input[1] in initializers and norm.op_type == "SkipSimplifiedLayerNormalization"
                and norm.output[0] == node.input[0] and uses[node.input[0]] == 1 and uses.get(norm.input[2]) == 1
                and norm.input[2] in initializers):
            pairs.append((norm.input[2], node.input[1], node.input[0]))
    if not pairs:
        return []
    lm = exposing(proto, [a for _, _, a in pairs], config)
    names = [a for _, _, a in pairs]
    maxima = {a: 0.0 for a in names}
    calibration.rewind()
    for feed in iter(calibration.get_next, None):
        for name, value in zip(names, lm.session.run(names, feed)):
            maxima[name] = np.maximum(maxima[name], np.abs(value).reshape(-1, value.shape[-1]).max(0))
    for gamma_name, weight_name, activation in pairs:
        gamma = onnx.numpy_helper.to_array(initializers[gamma_name])
        weight = onnx.numpy_helper.to_array(initializers[weight_name])  # [in, out]
        scale = maxima[activation] ** alpha / np.maximum(np.abs(weight).max(1), 1e-8) ** (1 - alpha)
        scale = np.where(maxima[activation] > 0, np.clip(scale, 1e-5, None), 1.0).astype(np.float32)
        initializers[gamma_name].CopyFrom(onnx.numpy_helper.from_array(gamma / scale, gamma_name))
        initializers[weight_name].CopyFrom(onnx.numpy_helper.from_array(weight * scale[:, None], weight_name))
    return [w for _, w, _ in pairs]


# --- the stage ------------------------------------------------------------------------------------------------------
def quantize(model_dir: str | Path = "runs/onnx", out: str | Path | None = None, *, calib: list | None = None,
             mode: str = "static", target: str = "auto", calib_samples: int = 32, calibration: str | None = None,
             per_channel: bool | None = None, exclude: tuple[str, ...] = (), auto_exclude: bool = False,
             eval_data: list | None = None, eval_windows: int = 24, max_bpb_increase: float = 0.02,
             min_agreement: float = 0.95, block_size: int = 32, accuracy_level: int = 4, force: bool = False,
             overwrite: bool = False, measure: bool = True, smoothquant: float | None = None,
             op_types: tuple[str, ...] | None = ("MatMul",)) -> dict:
    """Quantize the float export in `model_dir` into `out`. `op_types` is for experiments: anything but MatMul-only
    quantizes the attention path too and fails the gate; `measure` times fp32 against the result (on by default)."""
    if mode not in MODES:
        raise SPJError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if calibration is not None and calibration not in CALIBRATIONS:
        raise SPJError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if calib_samples <= 0 or eval_windows <= 0:
        raise SPJError("--calib-samples and --eval-windows must be positive")
    if block_size < 16 or block_size & (block_size - 1):
        raise SPJError(f"--block-size must be a power of two ≥ 16, got {block_size}")
    if smoothquant is not None and not (0 < smoothquant < 1 and mode == "static"):
        raise SPJError(f"--smoothquant takes an alpha in (0, 1) and goes with --mode static, got {smoothquant}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise SPJError(f"--accuracy-level must be 0-4, got {accuracy_level}")
    if not (0 <= max_bpb_increase and 0 <= min_agreement <= 1):
        raise SPJError("--max-bpb-increase must be ≥ 0 and --min-agreement in [0, 1]")
    if not calib and not eval_data:
        raise SPJError("no text given: pass --calib DIR (static mode calibrates on it; every mode measures its gate "
                       "on held-out text from it or from --eval)")
    profile = load_profile(target)
    logging.getLogger("onnxruntime.quantization.shape_inference").setLevel(logging.WARNING)
    model_dir = Path(model_dir)
    out = Path(out if out is not None else ("runs/int4" if mode == "int4" else "runs/int8"))
    check_output(out, [model_dir, *(calib or []), *(eval_data or [])], overwrite=overwrite)
    float_model = load_float_model(model_dir)
    settings = Settings(mode, profile, calibration or profile.calibration,
                        profile.per_channel if per_channel is None else per_channel, calib_samples, block_size,
                        accuracy_level, tuple(op_types) if op_types else None)
    started = time.perf_counter()

    # Text: calibration windows, and held-out windows for the gate that calibration never sees.
    tokenizer, cfg = float_model.tokenizer, float_model.config
    calib_stream, held_out = (token_streams(calib, tokenizer, 0.2) if calib else (np.zeros(0, np.int64), None))
    if eval_data:
        held_out = np.concatenate([token_streams([p], tokenizer, 1.0)[1] for p in eval_data])
    eval_set = spaced_windows(held_out, min(EVAL_WINDOW, cfg.max_position_embeddings), eval_windows)
    if not eval_set:
        raise SPJError(f"{', '.join(map(str, eval_data or calib))}: too little held-out text for the accuracy gate "
                       f"(need at least {EVAL_WINDOW} tokens)")
    float_lm = OnnxLM(float_model.path, cfg)
    calibration_reader = None
    if mode == "static":
        calib_set = spaced_windows(calib_stream, min(PREFILL + DECODE, cfg.max_position_embeddings), calib_samples)
        if len(calib_set) < min(4, calib_samples):
            raise SPJError(f"{', '.join(map(str, calib))}: too little text to calibrate ({len(calib_stream)} tokens; "
                           f"need {4 * (PREFILL + DECODE)} or more)")
        # ORT's histogram calibrators (entropy, percentile) stack every feed's tensors and so need one shape: they
        # get the same tokens one at a time, which gives a prefill's activations too, as causal attention is exact.
        prefill = PREFILL if settings.calibration == "minmax" else 1
        calibration_reader = KVCacheCalibration(float_lm, calib_set, prefill)
    byte_lengths = token_byte_lengths(tokenizer, cfg.vocab_size)
    reference = heldout_figures(float_lm, eval_set, byte_lengths)

    unknown = [n for n in exclude if n not in float_model.weight_matmuls]
    if unknown:
        raise SPJError(f"--exclude {unknown[0]}: no such weight MatMul (e.g. /lm_head/MatMul, "
                       f"/layers.0/mlp/down_proj/MatMul)")
    excluded = {n: "excluded by --exclude" for n in exclude}
    with scratch_dir(out) as tmp, tempfiles_in(tmp):
        prepared, source, smoothed = tmp / "prepared.onnx", float_model.path, []
        if smoothquant:
            proto = onnx.ModelProto()
            proto.CopyFrom(float_model.proto)
            smoothed = smooth(proto, cfg, calibration_reader, smoothquant)
            source = tmp / "smoothed.onnx"
            onnx.save(proto, str(source))
        # onnx's own shape inference suffices (the fused graph declares its contrib ops' outputs); ORT's symbolic
        # inference gives up on traced graphs, leaving a temporary model in the working directory as it does.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        candidate = tmp / "model.onnx"

        def attempt(excluded: dict) -> dict:
            nodes = [n for n in float_model.weight_matmuls if n not in excluded]
            quantize_graph(prepared, candidate, float_model, settings, nodes, calibration_reader)
            quantize_embedding(candidate)
            return gate_figures(reference, heldout_figures(OnnxLM(candidate, cfg), eval_set, byte_lengths))

        figures = attempt(excluded)
        failures = gate_failures(figures, max_bpb_increase, min_agreement)
        if failures and mode == "int4" and "/lm_head/MatMul" not in excluded:
            excluded["/lm_head/MatMul"] = "int4 LM head broke the accuracy gate"
            figures = attempt(excluded)
            failures = gate_failures(figures, max_bpb_increase, min_agreement)
        if failures and auto_exclude:
            order = [n for n in sensitivity_order(float_model, candidate, eval_set[0]) if n not in excluded]
            count = 1
            while failures and order:
                trial = {**excluded, **{n: "kept in float by --auto-exclude (most sensitive)" for n in order[:count]}}
                figures = attempt(trial)
                failures = gate_failures(figures, max_bpb_increase, min_agreement)
                if not failures or count == len(order):
                    excluded = trial
                    break
                count = min(2 * count, len(order))
        if failures and not force:
            raise SPJError(f"{mode} quantization failed the accuracy gate: {'; '.join(failures)}; nothing written "
                           "(--auto-exclude keeps the most sensitive layers in float, --force writes it anyway)")

        quantized = onnx.load(str(candidate))
        del quantized.metadata_props[:]
        meta = {p.key: p.value for p in float_model.proto.metadata_props}
        meta.update({"spj.quantization": mode, "spj.quantization_target": profile.name})
        for key, value in meta.items():
            quantized.metadata_props.add(key=key, value=value)
        onnx.save(quantized, str(candidate))
        executed = executed_ops(candidate)
        speed = {}
        if measure:
            for threads in (1, 2):
                speed[threads] = measure_speed({"float32": float_model.path, mode: candidate}, cfg, threads=threads)
        report = {
            "stage": "quantize", "mode": mode, "source": str(model_dir), "target": profile.name,
            "target_description": profile.description,
            "settings": {"calibration": settings.calibration if mode == "static" else None,
                         "per_channel": settings.per_channel, "reduce_range": profile.reduce_range,
                         "activation_type": profile.activation_type if mode == "static" else None,
                         "weight_type": "int4" if mode == "int4" else profile.weight_type,
                         "block_size": block_size if mode == "int4" else None,
                         "accuracy_level": accuracy_level if mode == "int4" else None,
                         "calibration_samples": len(calib_set) if mode == "static" else 0,
                         "smoothquant_alpha": smoothquant, "smoothed": smoothed,
                         "calibration_feeds": (f"per sample, a prefill of {calibration_reader.prefill} tokens then "
                                               f"{PREFILL + DECODE - calibration_reader.prefill} cached decode steps"
                                               if calibration_reader is not None else None)},
            "quantized": [n for n in float_model.weight_matmuls if n not in excluded],
            "embedding": "int8 rows with a float scale per row (for size: a Gather reads one row a token)",
            "excluded": {**excluded, "(everything but weight MatMuls and the embedding)": "attention scores, masks "
                         "and norms gain nothing from int8 and break when quantized"},
            "executed": executed,
            "gate": {**figures, "max_bpb_increase": max_bpb_increase, "min_agreement": min_agreement,
                     "passed": not failures, "failures": failures, "heldout_windows": len(eval_set)},
            "file_bytes": {"float32": float_model.path.stat().st_size, mode: candidate.stat().st_size},
            "speed": {f"threads_{t}": s for t, s in speed.items()},
            "elapsed_s": round(time.perf_counter() - started, 1),
        }
        if speed:
            best = max(speed, key=lambda t: speed[t][mode]["decode_tokens_per_s"])
            report["best_threads"] = best
            report["decode_speedup"] = (speed[best][mode]["decode_tokens_per_s"]
                                        / max(s["float32"]["decode_tokens_per_s"] for s in speed.values()))
        with staged_dir(out) as staged:
            (staged / "model.onnx").write_bytes(candidate.read_bytes())
            save_tokenizer(tokenizer, staged / "tokenizer.json")
            write_json(staged / "config.json", cfg.to_hf_dict())
            write_json(staged / "report.json", report)
    if failures:
        print(f"spj-edge: warning: {out} failed the accuracy gate and was written anyway (--force): "
              f"{'; '.join(failures)}")
    sizes = report["file_bytes"]
    rows = [("mode", f"{mode} ({profile.name})"), ("file", f"{sizes[mode] / 1e6:.2f} MB "
            f"({sizes[mode] / sizes['float32']:.0%} of float32)"),
            ("bits/byte", f"{figures['bits_per_byte']:.4f} vs {figures['bits_per_byte_float']:.4f} "
             f"({figures['bits_per_byte_increase']:+.2%})"),
            ("top-1 agreement", f"{figures['top1_agreement']:.2%} of {figures['positions']} positions"),
            ("integer kernels", json.dumps(executed["integer_ops"])), ("kept in float", len(excluded))]
    if speed:
        best = speed[report["best_threads"]]
        rows.append(("decode tokens/s", f"{best[mode]['decode_tokens_per_s']:.0f} vs float32 "
                     f"{best['float32']['decode_tokens_per_s']:.0f} ({report['best_threads']} threads)"))
    print_summary(f"quantize: {model_dir} → {out / 'model.onnx'}", rows)
    return report
