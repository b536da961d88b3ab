"""`spj-edge package`: an exported (or quantized) model → what goes onto the device.

    dist/NAME.spj/  model.onnx  model.onnx.data  tokenizer.json  spj.json   (--tar: NAME.spj.tar.gz holding that folder)

and, where the model came with them, Hugging Face's tokenizer_config.json, chat_template.jinja and
generation_config.json, for other tools (the runtime reads what it needs of them from the manifest).

spj.json, the manifest, carries what the runtime needs without onnx: the model config, the graph's I/O names, opset,
quantization mode and accuracy figures, the special token ids (every EOS id, whether the tokenizer puts <bos> in
front), the chat template, the model's generation defaults and the sha256 and size of each file.

model.onnx holds the nodes and the small tensors; its weights are ONNX external data in model.onnx.data, whatever the
model's size: onnxruntime maps that file and uses it in place, so the runtime holds one copy of the model (see
runtime/reader.py), and a graph past protobuf's 2 GiB can be packaged at all.

The graph gets one change: a Gather of the last position in front of the LM head, so that a prompt's forward step
computes one row of logits rather than one per prompt token (in a small model the LM head is the largest MatMul). The
I/O names stay the contract's; `logits` becomes [batch, 1, vocab] and the manifest says `"logits": "last"`.

The check: the written package is loaded by spj_edge.runtime (hashes, contract, session) and must continue a prompt
greedily token for token as the unchanged source graph does through the same loop. A failed check writes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import __version__, contract
from .artifact import open_export, parse_onnx
from .errors import SPJError
from .options import PackageOptions
from .outputs import check_output, name_output, scratch_dir, staged_dir, write_json, write_onnx
from .runtime import Generator, Package
from .runtime.reader import CHUNK, FORMAT_VERSION, MANIFEST, MODEL, TOKENIZER, WEIGHTS
from .tables import print_summary

# The LM head as a float, QDQ, dynamic int8 or int4 graph writes it: its MatMul, what rescales an integer result, and
# what prepares its input: quantizes it or, for a head on a GGUF's Q4_1 grid, appends its block sums (weight_grids.py).
# All work position by position, so the last row's logits are unchanged; only a dynamic quantization's scale then
# comes from the last row alone, as it does in every decode step.
HEAD_MATMULS = {"MatMul", "MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
HEAD_RESCALE = {"Mul", "Cast", "Add", "Concat"}  # Concat: a head in column parts (quantize.in_column_parts)
HEAD_INPUT_PREPARATION = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Concat"}
METADATA = ("spj.config", "spj.graph", "spj.quantization")  # written by `spj-edge export` and the quantizer
CHECK_PROMPT, CHECK_TOKENS = "Once upon a time, in a land far away,", 32


def package(model_dir: str | os.PathLike, out: str | os.PathLike, options: PackageOptions = PackageOptions(),
            overwrite: bool = False) -> dict:
    model_dir, out, tar = Path(model_dir), Path(out), options.tar
    target = out.with_name(f"{out.name}.tar.gz") if tar else out
    check_output(target, [model_dir], overwrite=overwrite, suffix=".tar.gz" if tar else None)
    export = open_export(model_dir)
    # An export whose weights are model.onnx.data already keeps them there: the graph alone is read and edited, and
    # the weights file copied as it is (a 1B model's 4.4 GB never pass through Python).
    weights_kept = export.weights_path.is_file()
    proto = parse_onnx(export.graph, export.graph_path) if weights_kept else export.proto
    meta = {p.key: p.value for p in proto.metadata_props}
    missing = [key for key in METADATA if key not in meta]
    if missing:
        raise SPJError(f"{export.graph_path}: not written by spj-edge export (its metadata lacks {', '.join(missing)})")
    config = export.config.to_hf_dict()
    tokenizer = export.tokenizer

    sliced = last_position_logits(proto, config)
    texts = tokenizer.files_to_save()
    manifest = {
        "format_version": FORMAT_VERSION,
        "model": config,
        "graph": meta["spj.graph"],
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "logits": "last" if sliced else "all",
        "io": {"inputs": [i.name for i in proto.graph.input], "outputs": [o.name for o in proto.graph.output]},
        "quantization": {"mode": meta["spj.quantization"], "target": meta.get("spj.quantization_target"),
                         "accuracy": export.report.get("gate", {})},  # the quantize stage's gate figures
        "special_tokens": {**tokenizer.config_ids(), "eos_token_ids": list(tokenizer.eos_ids),
                           "add_bos_token": tokenizer.special.adds_bos},
        "chat_template": tokenizer.chat_template,
        "generation": tokenizer.generation,  # generation_config.json's, over sampling.GENERATION_DEFAULTS
        "source": {"path": str(model_dir), "stage": export.report.get("stage"),
                   "checkpoint_sha256": meta.get("spj.source_sha256")},
        "created_by": f"spj-edge {__version__}",
    }
    reference = greedy_tokens(source_generator(export, manifest, texts[TOKENIZER]))  # gone before the package loads
    with _staged_tar(target, out.name) if tar else staged_dir(out) as folder:
        if weights_kept and external_locations(proto) == {WEIGHTS}:
            onnx.save_model(proto, str(folder / MODEL))  # the weights' references, offsets and all, stay valid
            shutil.copyfile(export.weights_path, folder / WEIGHTS)
        else:
            write_onnx(export.proto if weights_kept else proto, folder / MODEL, external_data=True)
        del proto
        onnx.checker.check_model(str(folder / MODEL))  # by path: a graph past 2 GiB is checked too
        for name, data in texts.items():
            (folder / name).write_bytes(data)
        manifest["files"] = {name: file_entry(folder / name) for name in (MODEL, WEIGHTS, *texts)}
        write_json(folder / MANIFEST, manifest)
        manifest["checks"] = {"source": export.report.get("checks", {}),
                              "package": check_against_source(greedy_tokens(Generator.load(folder)), reference)}
        write_json(folder / MANIFEST, manifest)  # spj.json is not hashed: it holds the hashes

    checks = manifest["checks"]["package"]
    print_summary(f"package: {model_dir} → {target}", [
        ("graph", f"{manifest['graph']}, opset {manifest['opset']}"),
        ("quantization", manifest["quantization"]["mode"]),
        ("logits", "last position only" if sliced else "every position (no LM head MatMul found)"),
        *((name, f"{entry['bytes'] / 1e6:.2f} MB") for name, entry in manifest["files"].items()),
        ("greedy continuation", f"identical to the source graph's, {checks['greedy_tokens']} tokens")])
    return {"stage": "package", "out": str(target), **manifest}


def file_entry(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def external_locations(proto: onnx.ModelProto) -> set[str]:
    """The files the graph's tensors keep their data in."""
    return {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def source_generator(export, manifest: dict, tokenizer_json: bytes) -> Generator:
    """The export's own graph (every position's logits), loaded by the runtime as the package is, for the check."""
    weights = export.weights_path
    kept = weights.is_file()
    files = {MODEL: export.graph, TOKENIZER: tokenizer_json}
    return Generator(Package(export.path, {**manifest, "logits": "all"}, files, export.path if kept else None,
                             weights.stat().st_size if kept else None))


def last_position_logits(proto: onnx.ModelProto, config: dict) -> bool:
    """Feed the LM head the last position only, in place; False (graph unchanged) where no LM head is recognised.

    The Gather goes on the float hidden state in front of the head, before any quantization of it, so a quantized
    head keeps the pattern ONNX Runtime fuses (Q → DQ → MatMul, DynamicQuantizeLinear → MatMulInteger)."""
    logits = contract.outputs(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"],
                              config["vocab_size"])[0].name
    graph = proto.graph
    head = _head_input_node(graph, logits)
    if head is None:
        return False
    index, hidden = "/lm_head/last_position.index", head.input[0]
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), index))
    gather = helper.make_node("Gather", [hidden, index], ["/lm_head/last_position/Gather_output_0"],
                              name="/lm_head/last_position/Gather", axis=1)
    # every reader of the hidden state is the head's: its MatMul, and a grid head's block sums (weight_grids.py)
    readers = [node for node in graph.node if hidden in node.input]
    for node in readers:
        node.input[:] = [gather.output[0] if name == hidden else name for name in node.input]
    graph.node.insert(min(list(graph.node).index(node) for node in readers), gather)
    sequence_axis = next(o for o in graph.output if o.name == logits).type.tensor_type.shape.dim[1]
    sequence_axis.Clear()
    sequence_axis.dim_value = 1
    return True


def _head_input_node(graph: onnx.GraphProto, logits: str) -> onnx.NodeProto | None:
    """The node whose input 0 is the hidden state the LM head projects: from `logits` back through a quantized head's
    rescaling to its MatMul, then through the quantization of the MatMul's input."""
    producers = {name: node for node in graph.node for name in node.output}
    node = producers.get(logits)
    while node is not None and node.op_type in HEAD_RESCALE:
        node = producers.get(node.input[0])
    if node is None or node.op_type not in HEAD_MATMULS:
        return None
    while (before := producers.get(node.input[0])) is not None and before.op_type in HEAD_INPUT_PREPARATION:
        node = before
    return node


def greedy_tokens(generator: Generator) -> list[int]:
    return list(generator.tokens(CHECK_PROMPT, max_new_tokens=CHECK_TOKENS, temperature=0.0, ignore_eos=True))


def check_against_source(produced: list[int], reference: list[int]) -> dict:
    if produced != reference:
        first = next(i for i, (a, b) in enumerate(zip(produced, reference)) if a != b)
        raise SPJError(f"package check failed: the packaged model's greedy continuation departs from the source "
                       f"graph's at token {first} of {len(reference)}; nothing written")
    return {"greedy_tokens": len(reference), "greedy_identical": True}


@contextlib.contextmanager
def _staged_tar(target: Path, folder_name: str) -> Iterator[Path]:
    """Like staged_dir, for a .tar.gz of one folder: `target` appears complete, or not at all."""
    with scratch_dir(target) as tmp:
        try:
            folder = tmp / folder_name
            folder.mkdir()
            yield folder
            archive = tmp / "package.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                tar.add(folder, arcname=folder_name)
            os.replace(archive, target)
        except BaseException as e:
            name_output(e, target, tmp)
            raise
