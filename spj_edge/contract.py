"""The ONNX I/O contract, as data: the names, types and dynamic axes of `model.onnx`'s inputs and outputs.

The same layout as Optimum and onnxruntime-genai, so their runtimes load our graphs and ours loads theirs. The
exporter, the quantizer's calibration reader and the device runtime all read this table; none spells a name itself.
Torch-free: the runtime imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import SPJError

# Axis names, shared by every tensor that has them.
BATCH, SEQUENCE, PAST, TOTAL = "batch", "sequence", "past_sequence", "total_sequence"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name
    dims: tuple[str | int, ...]  # a name is a dynamic axis


def inputs(num_layers: int, kv_heads: int, head_dim: int) -> list[TensorSpec]:
    specs = [
        TensorSpec("input_ids", "int64", (BATCH, SEQUENCE)),
        TensorSpec("attention_mask", "int64", (BATCH, TOTAL)),  # past + sequence; 1 = token, 0 = padding
        # Each token's rotary position. Rotary attention sees only differences of positions, so a row's may start
        # anywhere as long as they go up by one a token, the cached ones included: a left-padded prompt counts its
        # padding (the fused graph rotates a fresh prompt's row from its first id on, padding or not).
        TensorSpec("position_ids", "int64", (BATCH, SEQUENCE)),
    ]
    for i in range(num_layers):
        for kind in ("key", "value"):
            specs.append(TensorSpec(f"past_key_values.{i}.{kind}", "float32", (BATCH, kv_heads, PAST, head_dim)))
    return specs


def outputs(num_layers: int, kv_heads: int, head_dim: int, vocab_size: int) -> list[TensorSpec]:
    specs = [TensorSpec("logits", "float32", (BATCH, SEQUENCE, vocab_size))]
    for i in range(num_layers):
        for kind in ("key", "value"):
            specs.append(TensorSpec(f"present.{i}.{kind}", "float32", (BATCH, kv_heads, TOTAL, head_dim)))
    return specs


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def check_inputs(names: list[str], num_layers: int, kv_heads: int, head_dim: int, where: str) -> None:
    """Refuse a graph whose inputs are not this table's for the model's shape: a foreign model, or another config's."""
    expected = [s.name for s in inputs(num_layers, kv_heads, head_dim)]
    if list(names) != expected:
        raise SPJError(f"{where}: inputs {list(names)[:4]}… are not the spj-edge ONNX contract for its config "
                       f"({expected[:4]}…)")


def check_input_names(names: list[str], where: str) -> None:
    """Refuse, before its config is known, a graph whose inputs do not even begin as this table's: a foreign model."""
    fixed = [s.name for s in inputs(0, 0, 0)]
    if list(names)[:len(fixed)] != fixed:
        raise SPJError(f"{where}: inputs {list(names)[:4]}… are not the spj-edge ONNX contract ({fixed}, then the KV "
                       "cache)")
