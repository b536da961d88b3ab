"""What a package's model.onnx may hold, checked on its bytes before onnxruntime sees them, without the onnx package.

onnxruntime reads whatever files a graph's external-data tensors name, and runs a `Loop` for as long as the graph
says. So a package's graph is refused unless it is what spj-edge's exporter and quantizer write: tensors inside the
file or in the package's own verified model.onnx.data (no other file, no range past its end), no subgraphs and no
model-local functions (no control flow), only the op types of ALLOWED_OPS, and inputs, outputs and metadata that agree
with the manifest. The walk reads protobuf's wire format directly (field numbers from onnx.proto) and skips
tensor bytes without copying them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Iterator

from .. import contract
from ..errors import SPJError
from .reader import WEIGHTS

# The op types (domain, op_type) in what `spj-edge export` (fused or plain, opsets 14-21) and `spj-edge quantize`
# (static, dynamic, int4) write; nothing with a subgraph.
ALLOWED_OPS = frozenset({
    *(("", op) for op in (
        "Add", "And", "Cast", "Concat", "Constant", "ConstantOfShape", "DequantizeLinear", "Div",
        "DynamicQuantizeLinear", "Expand", "Gather", "Identity", "LessOrEqual", "MatMul", "MatMulInteger", "Mul",
        "Neg", "Not", "OneHot", "Pow", "QuantizeLinear", "Range", "ReduceMean", "ReduceSum", "Reshape", "Shape",
        "Sigmoid", "Slice", "Softmax", "Split", "Sqrt", "Sub", "Tile", "Transpose", "Unsqueeze", "Where")),
    *(("com.microsoft", op) for op in (
        "GroupQueryAttention", "MatMulNBits", "QuickGelu", "RotaryEmbedding", "SkipSimplifiedLayerNormalization")),
})
# A real graph of a billion parameters has well under a million fields outside its tensors' bytes; a crafted one that
# stores values one field each would otherwise keep this walk busy for minutes (a million take about 4 s).
MAX_FIELDS = 1_000_000
ELEMENT_TYPES = {"float32": 1, "int64": 7}  # TensorProto.DataType
EXTERNAL = 1  # TensorProto.DataLocation


class _Malformed(Exception):
    pass


@dataclass
class Graph:
    """What the runtime needs to know about a model.onnx before handing it to onnxruntime."""

    inputs: list[tuple[str, int, tuple]] = field(default_factory=list)  # name, element type, dims (int or str)
    outputs: list[tuple[str, int, tuple]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    ops: set[tuple[str, str]] = field(default_factory=set)  # (domain, op_type), "" for ai.onnx


def check_graph(model: bytes, manifest: dict, where: str, weights_bytes: int | None = None) -> None:
    """Refuse, in one line naming `where`, a graph that is not safe to load or that the manifest misdescribes.
    `weights_bytes`: the size of the verified WEIGHTS beside it; None: there is none, every tensor must be inside."""
    try:
        graph = _Walk(weights_bytes).model(memoryview(model))
    except _Malformed as e:
        raise SPJError(f"{where}: {e}") from None
    _check_io(graph, manifest, where)
    _check_ops(graph, where)
    _check_metadata(graph, manifest, where)


def _check_ops(graph: Graph, where: str) -> None:
    unknown = sorted(f"{domain}.{op}" if domain else op for domain, op in graph.ops - ALLOWED_OPS)
    if unknown:
        raise SPJError(f"{where}: has {', '.join(map(repr, unknown))} nodes, op types spj-edge's exporter and "
                       "quantizer never write; refusing to load it")


def _check_io(graph: Graph, manifest: dict, where: str) -> None:
    config = manifest["model"]
    layers, kv_heads, head_dim = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    wanted_inputs = 3 + 2 * layers
    if len(graph.inputs) != wanted_inputs:  # before listing the names: a manifest may claim a billion layers
        raise SPJError(f"{where}'s inputs do not follow the ONNX contract for its config ({len(graph.inputs)} inputs "
                       f"where {layers} layers need {wanted_inputs})")
    logits, *present = contract.outputs(layers, kv_heads, head_dim, config["vocab_size"])
    if manifest.get("logits") == "last":  # the package computes the last position's logits only
        logits = dataclasses.replace(logits, dims=(logits.dims[0], 1, *logits.dims[2:]))
    for kind, specs, found in (("inputs", contract.inputs(layers, kv_heads, head_dim), graph.inputs),
                               ("outputs", [logits, *present], graph.outputs)):
        wanted, have = {s.name for s in specs}, {name for name, _, _ in found}
        if wanted != have:
            raise SPJError(f"{where}'s {kind} do not follow the ONNX contract for its config (missing "
                           f"{sorted(wanted - have)}, unexpected {sorted(have - wanted)})")
        listed = manifest.get("io", {}).get(kind)  # the names in the graph's order (format 1 packages may lack it)
        if listed is not None and listed != [name for name, _, _ in found]:
            raise SPJError(f"{where}'s {kind} are not spj.json's io.{kind} (in order): the manifest describes "
                           "another graph")
        declared = {name: (element, dims) for name, element, dims in found}
        for spec in specs:
            element, dims = declared[spec.name]
            if element != ELEMENT_TYPES[spec.dtype] or not _same_shape(dims, spec.dims):
                raise SPJError(f"{where}: {kind[:-1]} {spec.name} is {_describe(element, dims)} where spj.json's "
                               f"model says {spec.dtype} {list(spec.dims)}")


def _same_shape(dims: tuple, expected: tuple) -> bool:
    """Fixed axes must match; a named (dynamic) axis may have any name but must not be fixed."""
    return len(dims) == len(expected) and all(
        d == e if isinstance(e, int) else isinstance(d, str) for d, e in zip(dims, expected))


def _describe(element: int, dims: tuple) -> str:
    names = {number: name for name, number in ELEMENT_TYPES.items()}
    return f"{names.get(element, f'element type {element}')} {list(dims)}"


def _check_metadata(graph: Graph, manifest: dict, where: str) -> None:
    """The numbers the runtime takes from spj.json must be those the graph was exported with (its `spj.config`
    metadata), so that a manifest cannot promise a longer context or another vocabulary than the graph has."""
    try:
        exported = json.loads(graph.metadata["spj.config"])
    except (KeyError, ValueError, RecursionError):
        raise SPJError(f"{where}: its metadata has no spj.config: not a graph written by spj-edge export") from None
    if not isinstance(exported, dict):
        raise SPJError(f"{where}: its spj.config metadata is not a JSON object")
    config = manifest["model"]
    differ = [f"{key} {config[key]!r} (the graph's: {exported.get(key)!r})"
              for key in ("num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size",
                          "max_position_embeddings") if exported.get(key) != config[key]]
    if differ:
        raise SPJError(f"{where}: spj.json's model does not describe this graph: {', '.join(differ)}")


class _Walk:
    """ModelProto → GraphProto → NodeProto / TensorProto, by field number; refuses as it goes."""

    def __init__(self, weights_bytes: int | None):
        self.fields = 0
        self.weights_bytes = weights_bytes

    def model(self, data: memoryview) -> Graph:
        graph = Graph()
        for number, value in self._fields(data):
            if number == 7:  # graph
                self._graph(_message(value, "graph"), graph)
            elif number == 14:  # metadata_props
                entry = dict(self._strings(_message(value, "metadata_props"), {1: "key", 2: "value"}))
                graph.metadata[entry.get("key", "")] = entry.get("value", "")
            elif number in (20, 25):
                raise _Malformed("holds model-local functions or training graphs, which spj-edge never writes; "
                                 "refusing to load it")
        return graph

    def _graph(self, data: memoryview, graph: Graph) -> None:
        for number, value in self._fields(data):
            if number == 1:
                graph.ops.add(self._node(_message(value, "node")))
            elif number == 5:
                self._tensor(_message(value, "initializer"))
            elif number == 15:
                self._sparse_tensor(_message(value, "sparse_initializer"))
            elif number in (11, 12):
                (graph.inputs if number == 11 else graph.outputs).append(self._value_info(_message(value, "input")))

    def _node(self, data: memoryview) -> tuple[str, str]:
        op_type, domain = "", ""
        attributes = []
        for number, value in self._fields(data):
            if number == 4:
                op_type = _text(value)
            elif number == 7:
                domain = _text(value)
            elif number == 5:
                attributes.append(_message(value, "attribute"))
        for attribute in attributes:
            self._attribute(attribute)
        return "" if domain == "ai.onnx" else domain, op_type

    def _attribute(self, data: memoryview) -> None:
        for number, value in self._fields(data):
            if number in (5, 10):  # t, tensors
                self._tensor(_message(value, "tensor"))
            elif number in (22, 23):  # sparse_tensor, sparse_tensors
                self._sparse_tensor(_message(value, "sparse tensor"))
            elif number in (6, 11):  # g, graphs
                raise _Malformed("has a subgraph (control flow), which spj-edge never writes; refusing to load it")

    def _sparse_tensor(self, data: memoryview) -> None:
        for number, value in self._fields(data):
            if number in (1, 2):  # values, indices
                self._tensor(_message(value, "sparse tensor"))

    def _tensor(self, data: memoryview) -> None:
        name, external, entries = "", False, {}
        for number, value in self._fields(data):
            if number == 8:
                name = _text(value)
            elif number == 13:  # external_data: key/value pairs
                entry = dict(self._strings(_message(value, "external_data"), {1: "key", 2: "value"}))
                entries[entry.get("key", "")] = entry.get("value", "")
            elif number == 14 and value == EXTERNAL:  # data_location
                external = True
        if external or entries:
            self._check_external(name, entries)

    def _check_external(self, name: str, entries: dict[str, str]) -> None:
        if self.weights_bytes is None:
            raise _Malformed(f"tensor {name!r} keeps its data in another file (external data) and the package has "
                             f"no verified {WEIGHTS}; refusing to load it")
        if entries.get("location") != WEIGHTS or set(entries) - {"location", "offset", "length"}:
            raise _Malformed(f"tensor {name!r} reads its data from {entries.get('location')!r} (with "
                             f"{sorted(entries)}), not from the package's {WEIGHTS} alone; refusing to load it")
        try:
            offset, length = int(entries.get("offset", "0")), int(entries["length"])
        except (KeyError, ValueError):
            raise _Malformed(f"tensor {name!r}: its external data has no valid offset and length") from None
        if not 0 <= offset <= offset + length <= self.weights_bytes:
            raise _Malformed(f"tensor {name!r} reads bytes {offset}-{offset + length} of {WEIGHTS}, which has "
                             f"{self.weights_bytes}; refusing to load it")

    def _value_info(self, data: memoryview) -> tuple[str, int, tuple]:
        name, element, dims = "", 0, []
        for number, value in self._fields(data):
            if number == 1:
                name = _text(value)
            elif number == 2:  # type → tensor_type
                for n, tensor_type in self._fields(_message(value, "type")):
                    if n == 1:
                        element, dims = self._tensor_type(_message(tensor_type, "tensor_type"))
        return name, element, tuple(dims)

    def _tensor_type(self, data: memoryview) -> tuple[int, list]:
        element, dims = 0, []
        for number, value in self._fields(data):
            if number == 1 and isinstance(value, int):
                element = value
            elif number == 2:  # shape → dim
                dims = [self._dimension(_message(d, "dim")) for n, d in self._fields(_message(value, "shape"))
                        if n == 1]
        return element, dims

    def _dimension(self, data: memoryview) -> int | str:
        dimension: int | str = ""
        for number, value in self._fields(data):
            if number == 1 and isinstance(value, int):
                dimension = value
            elif number == 2:
                dimension = _text(value)
        return dimension

    def _strings(self, data: memoryview, names: dict[int, str]) -> Iterator[tuple[str, str]]:
        for number, value in self._fields(data):
            if number in names:
                yield names[number], _text(value)

    def _fields(self, data: memoryview) -> Iterator[tuple[int, int | memoryview]]:
        """(field number, value) of one message: an int for numbers, a view of the bytes for the rest."""
        position, end = 0, len(data)
        while position < end:
            self.fields += 1
            if self.fields > MAX_FIELDS:
                raise _Malformed(f"more than {MAX_FIELDS} protobuf fields outside tensor data; refusing to load it")
            key, position = _varint(data, position)
            number, wire = key >> 3, key & 7
            if wire == 0:
                value, position = _varint(data, position)
            elif wire == 2:
                length, position = _varint(data, position)
                value, position = data[position:position + length], position + length
            elif wire in (1, 5):  # fixed 64 / 32 bits: no field read here has these types
                position += 8 if wire == 1 else 4
                value = -1
            else:
                raise _Malformed("not a valid ONNX model (an unknown protobuf wire type)")
            if position > end:
                raise _Malformed("not a valid ONNX model (truncated)")
            yield number, value


def _varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise _Malformed("not a valid ONNX model (a damaged number)")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        shift += 7
        if not byte & 0x80:
            return value, position


def _message(value, what: str) -> memoryview:
    if not isinstance(value, memoryview):
        raise _Malformed(f"not a valid ONNX model ({what} is not a message)")
    return value


def _text(value) -> str:
    try:
        return bytes(_message(value, "a name")).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed("not a valid ONNX model (a name is not UTF-8)") from None
