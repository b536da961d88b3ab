"""`spj-edge export`: the written graph against PyTorch and transformers, its names and metadata, and bad input."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import EXPORT_REPORTS, assert_one_line_error, cli, logit_bound
from spj_edge.artifact import open_export
from spj_edge.checkpoint import load_checkpoint
from spj_edge.errors import SPJError
from spj_edge.export import export_plain, logit_tolerance, verify
from spj_edge.model import positions_from_mask
from spj_edge.onnx_lm import OnnxLM
from spj_edge.outputs import MARKER

GRAPHS = ["plain", "fused"]


@pytest.fixture(scope="module", params=GRAPHS)
def exported(request):
    """The session's exports of nano_checkpoint (conftest: opset 17) and what export() returned for each."""
    out = request.getfixturevalue("nano_export" if request.param == "fused" else "nano_plain_export")
    return request.param, out, EXPORT_REPORTS[out]


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def feed(config, ids, mask, positions, past):
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    for i in range(config.num_hidden_layers):
        inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
    return inputs


def test_written_graph_matches_pytorch_from_an_empty_past_and_left_padded(exported, nano_checkpoint):
    kind, out, report = exported
    model, _ = load_checkpoint(nano_checkpoint)
    cfg = model.config
    assert cfg.num_attention_heads > cfg.num_key_value_heads, "nano must exercise GQA"
    ids = torch.randint(3, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # row 0 is left-padded
    positions = positions_from_mask(mask, ids.shape[1])
    empty = [np.zeros((2, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)] * (2 * cfg.num_hidden_layers)
    logits, *present = session(out / "model.onnx").run(None, feed(cfg, ids.numpy(), mask.numpy(), positions.numpy(),
                                                                  empty))
    with torch.no_grad():
        reference, ref_present = model(ids, mask, positions)
    real = mask.bool().numpy()
    assert np.abs(logits - reference.numpy())[real].max() < logit_bound(reference.numpy()[real])
    assert present[0].shape == (2, cfg.num_key_value_heads, 10, cfg.head_dim)
    np.testing.assert_allclose(present[1][1], ref_present[0][1][1].numpy(), atol=1e-5)
    checks = report["checks"]
    for check in ("prefill", "decode", "left_padded_batch", "long_prefill"):
        assert checks[f"{check}_max_abs_diff"] <= checks["tolerances"][check] < 1e-3, check
    assert checks["decode_steps"] >= 32 and checks["greedy_tokens"] == 64 and checks["greedy_identical"]
    assert checks["long_prefill_tokens"] == cfg.max_position_embeddings  # nano's context is under 256 tokens
    assert json.loads((out / "report.json").read_text())["checks"] == checks


def test_graph_names_lm_head_metadata_and_checker(exported):
    kind, out, report = exported
    proto = onnx.load(out / "model.onnx")
    onnx.checker.check_model(proto)
    nodes = {n.name: n for n in proto.graph.node}
    assert "/layers.1/mlp/down_proj/MatMul" in nodes and "/layers.0/self_attn/qkv_proj/MatMul" in nodes
    head = nodes["/lm_head/MatMul"]
    initializers = {i.name: i for i in proto.graph.initializer}
    assert head.input[1] == "lm_head.weight" and list(initializers["lm_head.weight"].dims) == [64, 512]
    assert "embed_tokens.weight" in initializers, "the embedding stays a Gather table of its own"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["spj.opset"] == "17" and meta["spj.graph"] == kind and meta["spj.quantization"] == "none"
    # what tells the step loop that the attention can write the cache in place (the plain graph's Concat cannot)
    assert OnnxLM(out / "model.onnx", open_export(out).config).shares_cache == (kind == "fused")
    assert json.loads(meta["spj.config"])["num_key_value_heads"] == 2
    assert meta["spj.source_sha256"] == report["source_sha256"]
    assert {p.name for p in out.iterdir()} == {"model.onnx", "tokenizer.json", "config.json", "report.json", MARKER}
    assert len(proto.graph.node) == report["nodes"]


def test_fused_graph_is_much_smaller(exported):
    kind, out, report = exported
    if kind == "fused":
        assert report["nodes"] < 60, report["nodes"]
    else:
        assert report["nodes"] > 300, report["nodes"]


def test_the_tolerance_grows_with_the_logits_and_the_sequence(nano_checkpoint):
    config = load_checkpoint(nano_checkpoint)[0].config
    small, large = np.ones(4), np.full(4, 30.0)
    assert logit_tolerance(config, large, 16) == pytest.approx(30 * logit_tolerance(config, small, 16))
    assert logit_tolerance(config, small, 256) > logit_tolerance(config, small, 16)
    # SmolLM2-135M's shape, its logits (about 30) and a 256-token prefill: the 1.6e-4 measured there passes
    smollm = config.replace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    assert 1e-3 < logit_tolerance(smollm, large, 256) < 1e-2


def test_a_wrong_graph_fails_verification(nano_checkpoint, tmp_path):
    model, tokenizer = load_checkpoint(nano_checkpoint)
    onnx.save(export_plain(model, 17), tmp_path / "model.onnx")
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(1.01)  # PyTorch now differs from the graph by a hair
    with pytest.raises(SPJError, match="export check failed: prefill logits differ from PyTorch by"):
        verify(tmp_path / "model.onnx", model, [1, 20, 30, 40])


def test_a_hugging_face_llama_checkpoint_exports_and_matches_transformers(tmp_path, nano_checkpoint):
    config = LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=96,
                         tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=5e4)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    hf_dir = tmp_path / "hf"
    hf.save_pretrained(hf_dir)
    shutil.copy(nano_checkpoint / "tokenizer.json", hf_dir / "tokenizer.json")
    result = cli("export", "--model", hf_dir, "--out", tmp_path / "onnx")
    assert result.returncode == 0, result.stderr
    ids = np.array([[1, 17, 300, 599, 42, 7]])
    empty = [np.zeros((1, 1, 0, 16), np.float32)] * 4
    logits = session(tmp_path / "onnx" / "model.onnx").run(
        ["logits"], feed(hf.config, ids, np.ones_like(ids), np.arange(6)[None], empty))[0]
    with torch.no_grad():
        reference = hf(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - reference).max() < logit_bound(reference)


def test_defaults_chain_from_the_training_stage(tmp_path, nano_checkpoint):
    shutil.copytree(nano_checkpoint, tmp_path / "runs" / "teacher")
    result = cli("export", "--opset", "17", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "runs" / "onnx" / "model.onnx").is_file()


@pytest.mark.parametrize("case", ["opset", "plain-opset", "truncated", "gpt2", "no-model", "tokenizer"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, nano_checkpoint, case):
    model = tmp_path / "model"
    shutil.copytree(nano_checkpoint, model)
    args, fragments = ["--model", model], []
    if case == "opset":
        args += ["--opset", "5"]
        fragments = ["--opset 5 is out of range", "opsets 14 to 21"]
    elif case == "plain-opset":
        args += ["--opset", "21", "--no-fuse"]
        fragments = ["--opset 21 is out of range: the plain exporter writes opsets 14 to 20"]
    elif case == "truncated":
        weights = model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        fragments = ["model.safetensors: corrupt or truncated safetensors file"]
    elif case == "gpt2":
        (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
        fragments = ["architecture GPT2LMHeadModel is not supported (supported: LlamaForCausalLM)"]
    elif case == "no-model":
        args = ["--model", tmp_path / "nothing"]
        fragments = ["nothing: no such checkpoint directory"]
    elif case == "tokenizer":
        (model / "tokenizer.json").write_text('{"not": "a tokenizer"}')
        fragments = ["tokenizer.json: not a valid tokenizer.json"]
    result = cli("export", *args, "--out", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
