"""`spj-edge export`: a checkpoint → `model.onnx` with the KV-cache contract of contract.py, verified against PyTorch.

Two graphs:
- plain: traced by PyTorch's TorchScript exporter, standard ONNX ops only (the kind of graph Optimum writes);
- fused: emitted directly (onnx_fused.py) with the ops ONNX Runtime runs natively: fused RMSNorm, rotary and
  attention, packed QKV; 10 nodes a layer where the trace has over 200.

Either way the graph is checked against the PyTorch model before anything is written (prefill with an empty past,
cached decode, a left-padded batch, a long prefill of real text, a greedy continuation), each within what float32
rounding allows for its logits and length; a failed check writes nothing.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from . import __version__, contract
from .checkpoint import checkpoint_sha256, load_checkpoint
from .errors import SPJError
from .generate import generate_ids
from .model import Transformer, positions_from_mask
from .onnx_lm import OnnxLM
from .outputs import check_output, staged_dir, write_json, write_onnx
from .tables import print_summary
from .sampling import Sampler, SamplingParams
from .tokenizer import save_tokenizer_files

# The TorchScript exporter's SDPA needs opset 14; 20 is the newest it writes.
PLAIN_OPSETS = range(14, 21)
UNIT_ROUNDOFF = 2.0 ** -24  # float32's: one rounding moves a value by at most this fraction of it
LONG_PREFILL = 256  # tokens of the long-prefill check (fewer where the context is shorter)
# Real text the checks run the model on: the short prompt, and for the long prefill, public-domain lines in the five
# languages of the shared data (Shakespeare, Hugo, Goethe, Cervantes, the Analects), repeated to length.
PROMPT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."
LONG_TEXT = (
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do shake the darling "
    "buds of May, And summer's lease hath all too short a date.\n"
    "En 1815, M. Charles-François-Bienvenu Myriel était évêque de Digne. C'était un vieillard d'environ soixante-quinze "
    "ans ; il occupait le siège de Digne depuis 1806.\n"
    "Habe nun, ach! Philosophie, Juristerei und Medizin, Und leider auch Theologie Durchaus studiert, mit heißem "
    "Bemühn. Da steh ich nun, ich armer Tor! Und bin so klug als wie zuvor.\n"
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo que vivía un hidalgo de los de "
    "lanza en astillero, adarga antigua, rocín flaco y galgo corredor.\n"
    "子曰：学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？\n")
DEFAULT_MODELS = ("runs/student", "runs/teacher")  # the newest stage that exists wins


def default_model() -> Path:
    for candidate in map(Path, DEFAULT_MODELS):
        if (candidate / "config.json").is_file():
            return candidate
    raise SPJError(f"no checkpoint found at {' or '.join(DEFAULT_MODELS)}; pass --model DIR")


def untied_copy(model: Transformer) -> Transformer:
    """The same network with the LM head as its own weight: ONNX Runtime's quantizers skip a transposed embedding,
    and in a small model that matrix is the largest one."""
    copy = Transformer(model.config.replace(tie_word_embeddings=False))
    state = model.state_dict()
    state.setdefault("lm_head.weight", state["embed_tokens.weight"].clone())
    copy.load_state_dict(state)
    return copy.eval()


def packed_weights(model: Transformer) -> dict[tuple[str, ...], torch.Tensor]:
    """The MatMul weights of the graph as [in, out] matrices, by module path; q/k/v and gate/up are packed."""
    weights = {("lm_head",): model.lm_head_weight().T}
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        weights[f"layers.{i}", "self_attn", "qkv_proj"] = attn.qkv_weight_and_bias()[0].T
        weights[f"layers.{i}", "self_attn", "o_proj"] = attn.o_proj.weight.T
        weights[f"layers.{i}", "mlp", "gate_up_proj"] = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).T
        weights[f"layers.{i}", "mlp", "down_proj"] = mlp.down_proj.weight.T
    return weights


def name_weight_matmuls(graph: onnx.GraphProto, model: Transformer) -> None:
    """Give the traced graph's weight MatMuls (and their initializers) the module names the fused graph uses:
    `/layers.3/mlp/down_proj/MatMul` on `layers.3.mlp.down_proj.weight`. The tracer names packed and tied weights
    `onnx::MatMul_123`; matching by content is exact and independent of trace order."""
    by_content = {hashlib.sha256(w.detach().float().contiguous().numpy().tobytes()).hexdigest(): path
                  for path, w in packed_weights(model).items()}
    renamed = {}
    for init in graph.initializer:
        array = onnx.numpy_helper.to_array(init)
        path = by_content.get(hashlib.sha256(np.ascontiguousarray(array, np.float32).tobytes()).hexdigest())
        if path is not None and array.ndim == 2:
            renamed[init.name] = path
            init.name = ".".join(path) + ".weight"
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in renamed:
            node.name = "/" + "/".join(renamed[node.input[1]]) + "/MatMul"
            node.input[1] = ".".join(renamed[node.input[1]]) + ".weight"


def export_plain(model: Transformer, opset: int) -> onnx.ModelProto:
    cfg = model.config
    traced = untied_copy(model)
    batch, seq, past = 2, 3, 2  # any sizes: every one of these axes is dynamic in the graph
    example = (
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).expand(batch, seq),
        [tuple(torch.zeros(batch, cfg.num_key_value_heads, past, cfg.head_dim) for _ in range(2))
         for _ in range(cfg.num_hidden_layers)],
    )
    specs_in = contract.inputs(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    specs_out = contract.outputs(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            traced, example, buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=[s.name for s in specs_in], output_names=[s.name for s in specs_out],
            dynamic_axes={s.name: {i: d for i, d in enumerate(s.dims) if isinstance(d, str)}
                          for s in specs_in + specs_out})
    proto = onnx.load_from_string(buffer.getvalue())
    name_weight_matmuls(proto.graph, traced)
    return proto


# --- verification ---------------------------------------------------------------------------------------------------
def logit_tolerance(config, reference: np.ndarray, attended: int) -> float:
    """How far the graph's logits may be from PyTorch's when both compute the same function in float32.

    They differ only in the order of their sums: onnxruntime's and PyTorch's kernels block and vectorise each dot
    product differently. A sum of n terms in any order is within n·u·Σ|terms| of the exact sum (Higham; u = 2**-24),
    so each sum of a layer carries a relative error of up to n·u; RMSNorm rescales the residual stream after every
    layer, so what reaches a logit is relative to the logits' own magnitude, and the longest sums in a layer set it:
    over the hidden width (projections, norms, the logit itself), the FFN width (down_proj) and the attended tokens
    (softmax and its weighted values). Two implementations, each that far from the exact value, may be twice as far
    from each other. This grows with the logits and with the sequence (a 256-token prefill of a 30-layer model has
    errors near 2e-4 where a 16-token prompt has 6e-5) and stays far below what a real defect moves a logit by (a
    wrong mask, position, bias or head: tenths or more).
    """
    longest_sum = config.hidden_size + config.intermediate_size + attended
    return 2 * longest_sum * UNIT_ROUNDOFF * max(1.0, float(np.abs(reference).max()))


def verify(graph: Path, model: Transformer, prompt_ids: list[int], long_prompt_ids: list[int] = (),
           decode_steps: int = 32, continuation: int = 64) -> dict:
    """Max |logit difference| vs PyTorch at prefill, over cached decode steps, for a left-padded batch of 2 and over
    a long prefill (`long_prompt_ids`, if given), each against its logit_tolerance, and whether a greedy continuation
    is token-identical. Raises SPJError naming the check that failed."""
    cfg = model.config
    onnx_lm = OnnxLM(Path(graph), cfg)
    room = cfg.max_position_embeddings - len(prompt_ids)
    decode_steps, continuation = min(decode_steps, room), min(continuation, room)
    report, tolerances = {}, {}

    def compare(check: str, ort_logits: np.ndarray, torch_logits: np.ndarray, attended: int) -> None:
        """Record the worst difference of `check` so far, and its tolerance for the logits compared."""
        key = f"{check}_max_abs_diff"
        report[key] = max(report.get(key, 0.0), float(np.abs(ort_logits - torch_logits).max()))
        tolerances[check] = max(tolerances.get(check, 0.0), logit_tolerance(cfg, torch_logits, attended))

    with torch.no_grad():
        # prefill from an empty past, then decode one token at a time through both caches; with the capacity known,
        # as the runtime decodes (one cache buffer written in place, where the graph can)
        ids = np.array([prompt_ids], np.int64)
        ort_step = onnx_lm.step(1, capacity=len(prompt_ids) + decode_steps)
        ort_logits = ort_step.extend(ids)
        torch_logits, torch_past = model(torch.from_numpy(ids))
        compare("prefill", ort_logits, torch_logits.numpy(), len(prompt_ids))
        report["decode_max_abs_diff"] = 0.0
        for step in range(decode_steps):
            token = np.array([[int(torch_logits[0, -1].argmax())]])
            ort_logits = ort_step.extend(token)
            torch_logits, torch_past = model(torch.from_numpy(token), past_key_values=torch_past)
            compare("decode", ort_logits, torch_logits.numpy(), len(prompt_ids) + step + 1)
        report["decode_steps"] = decode_steps

        # a batch of two, the shorter row left-padded, then a few decode steps
        short = prompt_ids[: max(1, len(prompt_ids) // 2)]
        pad = len(prompt_ids) - len(short)
        ids = np.array([prompt_ids, [cfg.pad_token_id] * pad + short], np.int64)
        mask = np.ones_like(ids)
        mask[1, :pad] = 0
        ort_step, torch_past = onnx_lm.step(2, capacity=len(prompt_ids) + 3), None
        for _ in range(min(4, room)):
            # PyTorch counts a row's positions from its first token; the graph is given them counted from the padding,
            # as the runtime gives them (contract.inputs): the same attention, as rotary sees only differences
            positions = positions_from_mask(torch.from_numpy(mask), ids.shape[1])
            ort_logits = ort_step(ids, mask, np.tile(np.arange(mask.shape[1] - ids.shape[1], mask.shape[1]), (2, 1)))
            torch_logits, torch_past = model(torch.from_numpy(ids), torch.from_numpy(mask), positions, torch_past)
            real = mask[:, -ids.shape[1]:].astype(bool)
            compare("left_padded_batch", ort_logits[real], torch_logits.numpy()[real], mask.shape[1])
            ids = torch_logits[:, -1:].argmax(-1).numpy()
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)

        # a long prompt of real text in one step: the longest sums, the rotary table far from position 0
        if long_prompt_ids:
            ids = np.array([long_prompt_ids], np.int64)
            ort_logits = onnx_lm.logits(ids)
            compare("long_prefill", ort_logits, model(torch.from_numpy(ids))[0].numpy(), len(long_prompt_ids))
            report["long_prefill_tokens"] = len(long_prompt_ids)

        # greedy continuation: PyTorch's reference loop against the runtime's
        greedy = Sampler(SamplingParams(temperature=0.0), cfg.vocab_size)
        reference = list(generate_ids(model, prompt_ids, continuation, greedy, eos_id=None))
        produced = list(onnx_lm.continuation(prompt_ids, continuation, greedy))
        report["greedy_tokens"] = continuation
        report["greedy_identical"] = produced == reference
        if not report["greedy_identical"]:
            first = next(i for i, (a, b) in enumerate(zip(produced, reference)) if a != b)
            report["greedy_first_difference"] = first

    report["tolerances"] = tolerances
    for check, tolerance in tolerances.items():
        difference = report[f"{check}_max_abs_diff"]
        if not difference <= tolerance:
            raise SPJError(f"export check failed: {check.replace('_', ' ')} logits differ from PyTorch by "
                           f"{difference:.2e} (> {tolerance:.1e}, what float32 rounding allows); nothing written")
    if not report["greedy_identical"]:
        raise SPJError(f"export check failed: the greedy continuation departs from PyTorch's at token "
                       f"{report['greedy_first_difference']} of {continuation}; nothing written")
    return report


def verification_prompt(tokenizer, config, text: str = PROMPT_TEXT, length: int = 16) -> list[int]:
    """<bos> and `length` - 1 tokens of real text (repeated if short; no longer than the context), so that the checks
    run the model where it was trained."""
    ids = [i for i in tokenizer.encode(text, add_special_tokens=False).ids if i < config.vocab_size]
    length = min(length, config.max_position_embeddings)
    ids = (ids * (length // max(1, len(ids)) + 1))[: length - 1]
    return [config.bos_token_id, *ids]


# --- the stage ------------------------------------------------------------------------------------------------------
def export(model_dir: str | Path | None, out: str | Path, opset: int = 17, fuse: bool = True,
           overwrite: bool = False, external_data: bool | None = None) -> dict:
    """`external_data`: the weights in model.onnx.data beside the graph (None: when the graph passes
    outputs.INLINE_MAX_BYTES; protobuf cannot hold 2 GiB in one file)."""
    if fuse:
        from .onnx_fused import FUSED_OPSETS, build_fused_model
    opsets = FUSED_OPSETS if fuse else PLAIN_OPSETS
    if opset not in opsets:
        raise SPJError(f"--opset {opset} is out of range: the {'fused' if fuse else 'plain'} exporter writes "
                       f"opsets {opsets.start} to {opsets.stop - 1}")
    model_dir = Path(model_dir) if model_dir is not None else default_model()
    out = Path(out)
    check_output(out, [model_dir], overwrite=overwrite)
    model, tokenizer = load_checkpoint(model_dir)
    started = time.perf_counter()
    proto = build_fused_model(model, opset) if fuse else export_plain(model, opset)
    export_s = time.perf_counter() - started
    config_json = model.config.to_hf_dict()
    source_sha = checkpoint_sha256(model_dir)
    # spj.config: what the runtime checks a package's manifest against; spj.graph, spj.quantization and
    # spj.source_sha256: read by package and quantize; spj.opset: for people and other tools
    for key, value in {"spj.config": json.dumps(config_json), "spj.opset": str(opset),
                       "spj.graph": "fused" if fuse else "plain", "spj.quantization": "none",
                       "spj.source_sha256": source_sha}.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name, proto.producer_version = "spj-edge", __version__
    nodes = len(proto.graph.node)
    with staged_dir(out) as tmp:
        graph = tmp / "model.onnx"
        write_onnx(proto, graph, external_data)
        del proto  # written: the weights are in the file (and the checks read them from there)
        try:
            onnx.checker.check_model(str(graph))  # by path: a graph with its weights beside it, of any size
        except onnx.checker.ValidationError as e:
            raise SPJError(f"export check failed: onnx.checker rejects the graph ({str(e).splitlines()[0]})") from None
        checks = verify(graph, model, verification_prompt(tokenizer, model.config),
                        verification_prompt(tokenizer, model.config, LONG_TEXT, LONG_PREFILL))
        file_bytes = sum(f.stat().st_size for f in tmp.glob("model.onnx*"))
        report = {
            "stage": "export", "source": str(model_dir), "source_sha256": source_sha, "opset": opset,
            "graph": "fused" if fuse else "plain", "nodes": nodes, "file_bytes": file_bytes,
            "external_data": (tmp / "model.onnx.data").is_file(),
            "parameters": model.config.num_parameters(), "export_s": round(export_s, 2),
            "checks": checks, "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
        }
        save_tokenizer_files(tokenizer, tmp)
        write_json(tmp / "config.json", config_json)
        write_json(tmp / "report.json", report)
    print_summary(f"export: {model_dir} → {out / 'model.onnx'}", [
        ("graph", report["graph"]), ("opset", opset), ("nodes", report["nodes"]),
        ("file", f"{file_bytes / 1e6:.2f} MB" + (" (weights in model.onnx.data)" if report["external_data"] else "")),
        ("prefill max |Δlogit|", f"{checks['prefill_max_abs_diff']:.1e}"),
        ("decode max |Δlogit|", f"{checks['decode_max_abs_diff']:.1e} over {checks['decode_steps']} steps"),
        ("left-padded batch", f"{checks['left_padded_batch_max_abs_diff']:.1e}"),
        ("long prefill", f"{checks['long_prefill_max_abs_diff']:.1e} over {checks['long_prefill_tokens']} tokens "
                         f"(allowed {checks['tolerances']['long_prefill']:.1e})"),
        ("greedy continuation", f"identical, {checks['greedy_tokens']} tokens")])
    return report
