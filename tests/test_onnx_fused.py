"""The fused ONNX graph against the PyTorch model it was built from, run by onnxruntime's CPU provider."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spj_edge import contract
from spj_edge.errors import SPJError
from spj_edge.config import SPJConfig
from spj_edge.model import Transformer, positions_from_mask
from spj_edge.onnx_fused import FUSED_OPSETS, build_fused_model
from spj_edge.onnx_lm import OnnxLM

# head size 16: GroupQueryAttention rotates q and k itself (onnxruntime's rotary there takes multiples of 16 only)
CFG = SPJConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
# head size 8: Split and two RotaryEmbedding nodes do it
NARROW_HEADS = SPJConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)
OPSET = 17
TOL = 1e-4


def random_model(seed: int = 0, config: SPJConfig = CFG) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced or missing norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def model() -> Transformer:
    return random_model()


@pytest.fixture(scope="module")
def graph(model) -> onnx.ModelProto:
    return build_fused_model(model, OPSET)


def session(graph: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])


def contract_positions(mask: torch.Tensor, n: int) -> torch.Tensor:
    """The last `n` positions of each row counted from its first slot, padding included, as the runtime gives them
    (contract.inputs)."""
    return torch.arange(mask.shape[1] - n, mask.shape[1]).expand(mask.shape[0], n)


def compare_generation(sess: ort.InferenceSession, model: Transformer, steps: list[int], batch: int = 2,
                       pad: int = 0) -> dict:
    """Feed `steps` tokens at a time, the first step on a zero-length past, the presents fed back as the next past; the
    last row is left-padded by `pad`. The worst differences from PyTorch over the real (unpadded) positions."""
    cfg = model.config
    layers = cfg.num_hidden_layers
    ids = torch.randint(3, cfg.vocab_size, (batch, sum(steps)), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, 0, dtype=torch.long)
    past = {contract.past_name(i, kind): np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
            for i in range(layers) for kind in ("key", "value")}
    torch_past, done = None, 0
    worst = {"logits": 0.0, "present": 0.0}
    for n in steps:
        step_ids = ids[:, done:done + n]
        mask = torch.cat((mask, torch.ones(batch, n, dtype=torch.long)), dim=1)
        mask[-1, :pad] = 0
        positions = contract_positions(mask, n)
        feed = {"input_ids": step_ids.numpy(), "attention_mask": mask.numpy(), "position_ids": positions.numpy(),
                **past}
        outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
        with torch.no_grad():
            logits, torch_past = model(step_ids, mask, positions, torch_past)
        real = mask[:, -n:].bool().numpy()
        assert outputs["logits"].shape == tuple(logits.shape)
        worst["logits"] = max(worst["logits"], np.abs(outputs["logits"] - logits.numpy())[real].max())
        for i in range(layers):
            for j, kind in enumerate(("key", "value")):
                present = outputs[contract.present_name(i, kind)]
                assert present.shape == (batch, cfg.num_key_value_heads, mask.shape[1], cfg.head_dim)
                diff = np.abs(present - torch_past[i][j].numpy()).transpose(0, 2, 1, 3)[mask.bool().numpy()]
                worst["present"] = max(worst["present"], diff.max())
                past[contract.past_name(i, kind)] = present
        done += n
    return worst


def test_left_padded_prefill_and_cached_decode_match_pytorch(graph, model):
    worst = compare_generation(session(graph), model, steps=[12] + [1] * 8, pad=5)
    assert worst["logits"] <= TOL, worst
    assert worst["present"] <= TOL, worst


def test_a_left_padded_rows_positions_may_start_at_its_padding(model):
    """Rotary attention sees only differences of positions: PyTorch given a padded row's positions from its first
    token and given them from its padding (the contract's way) agree, to float32's rounding of other angles."""
    ids = torch.randint(3, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        from_token, _ = model(ids, mask, positions_from_mask(mask, 12))
        from_padding, _ = model(ids, mask, contract_positions(mask, 12))
    assert not torch.equal(positions_from_mask(mask, 12), contract_positions(mask, 12))
    assert torch.abs(from_token - from_padding)[mask.bool()].max() <= TOL


def test_narrow_heads_rotate_in_their_own_nodes_and_match_pytorch():
    model = random_model(config=NARROW_HEADS)
    graph = build_fused_model(model, OPSET)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("RotaryEmbedding") == 2 * NARROW_HEADS.num_hidden_layers and "Split" in ops
    worst = compare_generation(session(graph), model, steps=[12] + [1] * 4, pad=5)
    assert worst["logits"] <= TOL and worst["present"] <= TOL, worst


def test_multi_token_steps_on_a_cache_match_pytorch_at_batch_1(graph, model):
    # A chat's next turn. (At batch > 1 onnxruntime's GroupQueryAttention refuses such a step with an error.)
    worst = compare_generation(session(graph), model, steps=[6, 4, 1, 3], batch=1)
    assert worst["logits"] <= TOL, worst
    assert worst["present"] <= TOL, worst


def test_decoding_into_one_cache_buffer_matches_pytorch_and_writes_it_in_place(graph, model):
    """The runtime's way: each layer's cache one buffer, bound as its past and its present, that GroupQueryAttention
    writes the new positions into; a left-padded batch, prompt then single tokens, against PyTorch."""
    tagged = onnx.ModelProto()
    tagged.CopyFrom(graph)
    tagged.metadata_props.add(key="spj.graph", value="fused")  # as export writes it: what says the graph can share
    lm = OnnxLM(tagged.SerializeToString(), CFG)
    assert lm.shares_cache
    steps, batch, pad = [12] + [1] * 8, 2, 5
    step = lm.step(batch, capacity=sum(steps))
    ids = torch.randint(3, CFG.vocab_size, (batch, sum(steps)), generator=torch.Generator().manual_seed(2))
    mask, torch_past, done, worst = torch.ones(batch, 0, dtype=torch.long), None, 0, 0.0
    for n in steps:
        mask = torch.cat((mask, torch.ones(batch, n, dtype=torch.long)), dim=1)
        mask[-1, :pad] = 0
        positions = contract_positions(mask, n)
        logits = step(ids[:, done:done + n].numpy(), mask.numpy(), positions.numpy())
        with torch.no_grad():
            expected, torch_past = model(ids[:, done:done + n], mask, positions, torch_past)
        worst = max(worst, np.abs(logits - expected.numpy())[mask[:, -n:].bool().numpy()].max())
        done += n
    assert worst <= TOL
    # no present was allocated: the outputs are the buffers bound as the pasts, and they hold PyTorch's cache
    presents = step.binding.get_outputs()[1:]
    assert [p.data_ptr() for p in presents] == [b.ctypes.data for b in step.buffers]
    real = mask.bool().numpy()
    for cache, expected in zip(step.cache(), (kv for layer in torch_past for kv in layer)):
        assert cache.shape == tuple(expected.shape)
        assert np.abs(cache - expected.numpy()).transpose(0, 2, 1, 3)[real].max() <= TOL
    with pytest.raises(SPJError, match=f"past the {sum(steps)} its cache was made for"):
        step.extend(ids[:, :1].numpy())


def test_io_follows_the_contract(graph):
    layers, kv, head_dim = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim

    def described(values):
        return [(v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim)) for v in values]

    assert described(graph.graph.input) == [(s.name, s.dtype, s.dims) for s in contract.inputs(layers, kv, head_dim)]
    assert described(graph.graph.output) == [(s.name, s.dtype, s.dims)
                                             for s in contract.outputs(layers, kv, head_dim, CFG.vocab_size)]


@pytest.mark.parametrize("opset", [FUSED_OPSETS[0], FUSED_OPSETS[-1]])
def test_opsets_at_both_ends_of_the_range(model, opset):
    graph = build_fused_model(model, opset)
    onnx.checker.check_model(graph, full_check=True)
    assert {o.domain: o.version for o in graph.opset_import} == {"": opset, "com.microsoft": 1}
    worst = compare_generation(session(graph), model, steps=[6, 1, 1], pad=2)
    assert worst["logits"] <= TOL, worst


@pytest.mark.parametrize("opset", [FUSED_OPSETS[0] - 1, FUSED_OPSETS[-1] + 1])
def test_opset_outside_the_range_is_refused(model, opset):
    with pytest.raises(SPJError, match=f"opset {opset}") as e:
        build_fused_model(model, opset)
    assert "\n" not in str(e.value)


def test_graph_is_fused_and_compact(graph):
    layers = CFG.num_hidden_layers
    ops = [n.op_type for n in graph.graph.node]
    assert len(ops) < layers * 12 + 20, ops  # 10 a layer; an unfused trace is over 200
    assert ops.count("GroupQueryAttention") == layers
    assert ops.count("RotaryEmbedding") == 0 and ops.count("Split") == layers  # gate/up's; q/k/v go in packed
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers + 1  # and the final norm
    assert ops.count("MatMul") == 4 * layers + 1  # qkv, o, gate_up, down; the LM head
    assert not {"Transpose", "Softmax", "ReduceMean", "Pow", "Sqrt"} & set(ops)


def test_names_are_hierarchical_and_weights_are_matmul_initializers(graph, model):
    names = [n.name for n in graph.graph.node]
    assert len(set(names)) == len(names)
    for expected in ("/embed_tokens/Gather", "/layers.1/input_layernorm/SkipSimplifiedLayerNormalization",
                     "/layers.1/self_attn/qkv_proj/MatMul", "/layers.1/self_attn/GroupQueryAttention",
                     "/layers.1/self_attn/o_proj/MatMul",
                     "/layers.1/post_attention_layernorm/SkipSimplifiedLayerNormalization",
                     "/layers.1/mlp/gate_up_proj/MatMul", "/layers.1/mlp/down_proj/MatMul",
                     "/norm/SkipSimplifiedLayerNormalization", "/lm_head/MatMul"):
        assert expected in names
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    h, q, kv = CFG.hidden_size, CFG.num_attention_heads * CFG.head_dim, CFG.num_key_value_heads * CFG.head_dim
    assert weights["layers.1.self_attn.qkv_proj.weight"].shape == (h, q + 2 * kv)
    assert weights["layers.1.mlp.gate_up_proj.weight"].shape == (h, 2 * CFG.intermediate_size)
    for node in graph.graph.node:
        if node.op_type == "MatMul":  # what the static quantizer picks: ai.onnx MatMul, B a constant initializer
            assert node.domain == "" and node.input[1] in weights and node.input[0] not in weights, node.name
            assert node.input[1] == node.name[1:].replace("/", ".").replace(".MatMul", ".weight"), node.name
    gather = next(n for n in graph.graph.node if n.name == "/embed_tokens/Gather")
    assert list(gather.input) == ["embed_tokens.weight", "input_ids"]
    lm_head = next(n for n in graph.graph.node if n.name == "/lm_head/MatMul")
    assert lm_head.input[1] == "lm_head.weight" != "embed_tokens.weight"
    np.testing.assert_array_equal(weights["lm_head.weight"], model.embed_tokens.weight.detach().numpy().T)


def test_builds_are_byte_identical(graph, model):
    twin = random_model()  # the same weights in a different object: nothing may depend on identity or order of calls
    assert build_fused_model(model, OPSET).SerializeToString() == graph.SerializeToString()
    assert build_fused_model(twin, OPSET).SerializeToString() == graph.SerializeToString()
    assert build_fused_model(random_model(seed=1), OPSET).SerializeToString() != graph.SerializeToString()


def test_matmul_activations_have_types_for_the_quantizer(graph):
    """quantize_static reads element types from onnx's shape inference and skips every tensor without one."""
    inferred = onnx.shape_inference.infer_shapes(graph)
    typed = {v.name for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
             if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    for node in graph.graph.node:
        if node.op_type == "MatMul":
            assert {node.input[0], node.output[0]} <= typed, node.name
