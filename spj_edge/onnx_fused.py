"""The model as a compact ONNX graph of the fused operators ONNX Runtime's CPU provider runs natively.

Built node by node with `onnx.helper` rather than traced by torch.onnx: 10 nodes a layer where a trace has over 200,
each layer being (for a head size that is a multiple of 16; see below)

    SkipSimplifiedLayerNormalization → qkv_proj MatMul → GroupQueryAttention (rotary inside) → o_proj MatMul →
    SkipSimplifiedLayerNormalization → gate_up_proj MatMul → Split → QuickGelu (SiLU) → Mul → down_proj MatMul

A checkpoint with attention_bias adds an Add after the qkv_proj and o_proj MatMuls (12 nodes a layer), its q, k and
v biases packed like their weights. Inputs and outputs are exactly contract.py's, so the runtime feeds this graph as it
feeds the plain export. Every projection, the LM head included, is a plain ai.onnx MatMul on its own constant
[in, out] initializer, which is what the static quantizer looks for; the embedding stays a Gather on the untransposed
table.

Attention is GroupQueryAttention on the un-expanded KV heads, fed q, k and v packed as the qkv MatMul makes them; it
also writes the present cache in the contract's [batch, kv_heads, past + sequence, head_dim] layout. Its length
bookkeeping (`seqlens_k`) can only describe right padding, so every row is given the full length past + sequence and
the left padding is masked instead by an additive attention_bias built from attention_mask, with the float32 minimum
as model.py uses. It applies the rotary embedding itself (three nodes a layer fewer than Split and two
RotaryEmbedding: 5-9 % faster decode of SmolLM2-135M int4), where onnxruntime allows it (a head size that is a multiple
of 16; otherwise those three nodes do it), with one difference from position_ids read token by token: on a prompt over
an empty cache it rotates a row's i-th token at that row's first position id + i. A left-padded prompt is therefore
given positions that count its padding (contract.py: only their differences matter).

Limits, both from onnxruntime: the graph needs onnxruntime >= MIN_ONNXRUNTIME (GroupQueryAttention takes an
attention_bias from 1.22), and its CPU kernel refuses, with an error rather than a wrong answer, a step of several
tokens on a non-empty past when batch > 1 (batch 1 is fine, as are a prompt on an empty past and single-token steps).
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from . import contract
from .errors import SPJError
from .model import MLP, Attention, RMSNorm, Transformer

MIN_ONNXRUNTIME = "1.22"
# 14 to 21, as the CLI documents: Unsqueeze and Split take their axes and sizes as inputs throughout (from 13 on), and
# onnxruntime MIN_ONNXRUNTIME loads them all (up to 22).
FUSED_OPSETS = range(14, 22)
MS_DOMAIN = "com.microsoft"
FLOAT_MIN = np.finfo(np.float32).min


class _GraphBuilder:
    """Collects nodes and initializers, naming each node `{scope}/{op_type}` as the torch exporter does."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self._taken: set[str] = set()

    def weight(self, name: str, value: torch.Tensor | np.ndarray) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().to(device="cpu", dtype=torch.float32).numpy()
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        """A small constant shared by every node that needs the same value."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(value, name)
        return name

    def op(self, scope: str, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "",
           outputs: list[str] | None = None, **attrs) -> list[str]:
        name = f"{scope}/{op_type}"
        suffix = 0
        while name in self._taken:  # a second op of the same type in one scope: Mul, Mul_1, as torch names them
            suffix += 1
            name = f"{scope}/{op_type}_{suffix}"
        self._taken.add(name)
        outputs = outputs or [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs

    def op1(self, scope: str, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(scope, op_type, inputs, **kw)[0]

    def contrib(self, scope: str, op_type: str, inputs: list[str], widths: list[int | None],
                outputs: list[str] | None = None, **attrs) -> list[str]:
        """A com.microsoft op whose outputs are declared float32 [batch, sequence, width] (None: declared elsewhere or
        unused). onnx's shape inference can't see through these ops, and without the types that follow from them
        the static quantizer leaves the activations unquantized."""
        outputs = self.op(scope, op_type, inputs, n_out=len(widths), domain=MS_DOMAIN, outputs=outputs, **attrs)
        for name, width in zip(outputs, widths):
            if width is not None:
                self.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                     [contract.BATCH, contract.SEQUENCE, width]))
        return outputs


def build_fused_model(model: Transformer, opset: int) -> onnx.ModelProto:
    """The fused ONNX graph of `model` for ai.onnx `opset` (one of FUSED_OPSETS); the same model, the same bytes."""
    if opset not in FUSED_OPSETS:
        raise SPJError(f"opset {opset} is not supported by the fused graph "
                       f"(supported: {FUSED_OPSETS.start}..{FUSED_OPSETS.stop - 1})")
    cfg = model.config
    b = _GraphBuilder()
    with torch.no_grad():
        hidden = b.op1("/embed_tokens", "Gather", [b.weight("embed_tokens.weight", model.embed_tokens.weight),
                                                    "input_ids"])
        attention = _attention_inputs(b)
        rotary = (b.weight("rotary.cos_cache", model.rope_cos[:, :cfg.head_dim // 2]),
                  b.weight("rotary.sin_cache", model.rope_sin[:, :cfg.head_dim // 2]))
        residual, mlp_out = hidden, None
        for i, layer in enumerate(model.layers):
            scope = f"/layers.{i}"
            normed, residual = _rms_norm(b, f"{scope}/input_layernorm", f"layers.{i}.input_layernorm",
                                         layer.input_layernorm, residual, mlp_out)
            attn_out = _self_attention(b, i, layer.self_attn, normed, attention, rotary)
            normed, residual = _rms_norm(b, f"{scope}/post_attention_layernorm",
                                         f"layers.{i}.post_attention_layernorm", layer.post_attention_layernorm,
                                         residual, attn_out)
            mlp_out = _mlp(b, i, layer.mlp, normed)
        normed, _ = _rms_norm(b, "/norm", "norm", model.norm, residual, mlp_out)
        b.op("/lm_head", "MatMul", [normed, b.weight("lm_head.weight", model.lm_head_weight().T)],
             outputs=["logits"])

    n_layers, kv_heads, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    graph = helper.make_graph(
        b.nodes, "spj_fused",
        [_value_info(s) for s in contract.inputs(n_layers, kv_heads, head_dim)],
        [_value_info(s) for s in contract.outputs(n_layers, kv_heads, head_dim, cfg.vocab_size)],
        value_info=b.value_info)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)]
    # The oldest IR version the opset allows, so that older runtimes load the file too.
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="spj-edge",
                              ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    # Moved in one at a time (protobuf copies on append): make_graph and make_model would each copy every weight,
    # three copies of a 1B model's 4.4 GB at once beside PyTorch's own.
    for name in list(b.initializers):
        proto.graph.initializer.append(b.initializers.pop(name))
    return proto


def _value_info(spec: contract.TensorSpec) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                                         list(spec.dims))


def _attention_inputs(b: _GraphBuilder) -> tuple[str, str, str]:
    """GroupQueryAttention's seqlens_k, total_sequence_length and attention_bias, shared by every layer.

    Every row's length is the whole past + sequence (seqlens_k = total - 1), so the cache is one rectangle, left
    padding included; the padding is masked by the bias: 0 for a token, the float32 minimum for padding. The minimum
    rather than -inf keeps a padding query's row finite, as in model.py.
    """
    scope = "/attention_mask"
    one = b.const("const.int64.[1]", np.array([1], np.int64))
    mask_shape = b.op1(scope, "Shape", ["attention_mask"])
    total = b.op1(scope, "Gather", [b.op1(scope, "Cast", [mask_shape], to=TensorProto.INT32),
                                    b.const("const.int64.1", np.array(1, np.int64))])  # a scalar, as the op wants
    batch = b.op1(scope, "Gather", [mask_shape, b.const("const.int64.[0]", np.array([0], np.int64))])
    seqlens_k = b.op1(scope, "Expand", [b.op1(scope, "Sub", [total, b.const("const.int32.1", np.array(1, np.int32))]),
                                        batch])
    bias = b.op1(scope, "Where", [b.op1(scope, "Cast", ["attention_mask"], to=TensorProto.BOOL),
                                  b.const("const.float.0", np.array(0, np.float32)),
                                  b.const("const.float.min", np.array(FLOAT_MIN, np.float32))])
    bias = b.op1(scope, "Unsqueeze", [bias, b.const("const.int64.[1,2]", np.array([1, 2], np.int64))])
    # [batch, 1, 1, total] → [batch, 1, sequence, total]: the op does not broadcast the query axis.
    sequence = b.op1("/input_ids", "Gather", [b.op1("/input_ids", "Shape", ["input_ids"]), one])
    bias = b.op1(scope, "Expand", [bias, b.op1(scope, "Concat", [one, one, sequence, one], axis=0)])
    return seqlens_k, total, bias


def _rms_norm(b: _GraphBuilder, scope: str, weight_prefix: str, norm: RMSNorm, residual: str,
              update: str | None) -> tuple[str, str]:
    """RMSNorm(residual + update), and residual + update, the residual stream from here on."""
    gamma, width = b.weight(f"{weight_prefix}.weight", norm.weight), norm.weight.shape[0]
    if update is None:
        # The first norm has no addition to fuse, but ORT's plain SimplifiedLayerNormalization is registered in the
        # ai.onnx domain, where onnx.checker rejects it (ai.onnx has RMSNormalization only from opset 23). RMS norm is
        # scale-invariant but for epsilon, and doubling is exact in floating point: norm_eps(x) == norm_4eps(x + x).
        normed, = b.contrib(scope, "SkipSimplifiedLayerNormalization", [residual, residual, gamma], [width],
                            epsilon=4 * norm.eps)
        return normed, residual
    name = f"{scope}/SkipSimplifiedLayerNormalization"
    normed, _, _, summed = b.contrib(scope, "SkipSimplifiedLayerNormalization", [update, residual, gamma],
                                     [width, None, None, width],
                                     outputs=[f"{name}_output_0", "", "", f"{name}_output_3"], epsilon=norm.eps)
    return normed, summed


def _self_attention(b: _GraphBuilder, i: int, attn: Attention, x: str, attention: tuple[str, str, str],
                    rotary: tuple[str, str]) -> str:
    scope, prefix = f"/layers.{i}/self_attn", f"layers.{i}.self_attn"
    q_size = attn.n_heads * attn.head_dim
    qkv_weight, qkv_bias = attn.qkv_weight_and_bias()
    qkv = _projection(b, f"{scope}/qkv_proj", f"{prefix}.qkv_proj", x, qkv_weight, qkv_bias)
    seqlens_k, total, bias = attention
    # Hugging Face's rotate_half convention: the first and second halves of each head pair up (interleaved=0)
    if attn.head_dim % 16 == 0:  # onnxruntime's rotary inside GroupQueryAttention wants no other head size
        qkv_inputs, rotary_inputs = [qkv, "", ""], [*rotary, "position_ids"]
        rotation = {"do_rotary": 1, "rotary_interleaved": 0}
    else:
        kv_size = attn.n_kv_heads * attn.head_dim
        q, k, v = b.op(scope, "Split", [qkv, b.const(f"const.split.qkv.{q_size}.{kv_size}",
                                                     np.array([q_size, kv_size, kv_size], np.int64))], n_out=3, axis=-1)
        q, = b.contrib(f"{scope}/q_rotary", "RotaryEmbedding", [q, "position_ids", *rotary], [q_size], interleaved=0)
        k, = b.contrib(f"{scope}/k_rotary", "RotaryEmbedding", [k, "position_ids", *rotary], [kv_size], interleaved=0)
        qkv_inputs, rotary_inputs, rotation = [q, k, v], ["", "", ""], {}
    y, _, _ = b.contrib(scope, "GroupQueryAttention",
                        [*qkv_inputs, contract.past_name(i, "key"), contract.past_name(i, "value"), seqlens_k, total,
                         *rotary_inputs, bias],
                        [q_size, None, None],
                        outputs=[f"{scope}/GroupQueryAttention_output_0", contract.present_name(i, "key"),
                                 contract.present_name(i, "value")],
                        num_heads=attn.n_heads, kv_num_heads=attn.n_kv_heads, **rotation)
    return _projection(b, f"{scope}/o_proj", f"{prefix}.o_proj", y, attn.o_proj.weight, attn.o_proj.bias)


def _projection(b: _GraphBuilder, scope: str, prefix: str, x: str, weight: torch.Tensor,
                bias: torch.Tensor | None) -> str:
    """x · weightᵀ (+ bias): the MatMul alone on its constant weight, as the static quantizer wants it, and the bias
    (attention_bias checkpoints) as an Add after it."""
    y = b.op1(scope, "MatMul", [x, b.weight(f"{prefix}.weight", weight.T)])
    return y if bias is None else b.op1(scope, "Add", [y, b.weight(f"{prefix}.bias", bias)])


def _mlp(b: _GraphBuilder, i: int, mlp: MLP, x: str) -> str:
    scope, prefix = f"/layers.{i}/mlp", f"layers.{i}.mlp"
    size = mlp.gate_proj.out_features
    gate_up_weight = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).T
    gate_up = b.op1(f"{scope}/gate_up_proj", "MatMul", [x, b.weight(f"{prefix}.gate_up_proj.weight", gate_up_weight)])
    gate, up = b.op(scope, "Split", [gate_up, b.const(f"const.split.gate_up.{size}", np.array([size, size], np.int64))],
                    n_out=2, axis=-1)
    # QuickGelu is x·sigmoid(alpha·x): with alpha 1 it is SiLU, one vectorised kernel instead of Sigmoid and Mul.
    act, = b.contrib(f"{scope}/act_fn", "QuickGelu", [gate], [size], alpha=1.0)
    return b.op1(f"{scope}/down_proj", "MatMul", [b.op1(scope, "Mul", [act, up]),
                                                   b.weight(f"{prefix}.down_proj.weight", mlp.down_proj.weight.T)])
