"""Hugging Face Llama checkpoints as they are published (bf16/fp16, sharded, tied or not, head_dim ≠ hidden/heads,
llama3 and linear rope scaling, attention biases, a list of EOS ids) load in our model with transformers' logits and
export to ONNX graphs with the same logits. Each is a tiny random `LlamaForCausalLM` saved with save_pretrained."""
import copy
import json

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from conftest import SHAKESPEARE, assert_one_line_error, cli, logit_bound
from spj_edge.artifact import open_checkpoint
from spj_edge.checkpoint import load_model
from spj_edge.errors import SPJError
from spj_edge.export import export
from spj_edge.onnx_lm import OnnxLM
from spj_edge.tokenizer import save_tokenizer, train_tokenizer

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, initializer_range=0.1)  # larger weights than a fresh model's, so that each feature shows
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          # far below the context, so that the test's positions run through scaled, kept and interpolated frequencies
          "original_max_position_embeddings": 32}
# name: (LlamaConfig changes, dtype, save_pretrained's max_shard_size)
VARIANTS = {
    "bf16-sharded": ({}, torch.bfloat16, "40KB"),
    "fp16-untied": ({"tie_word_embeddings": False}, torch.float16, None),
    "head-dim": ({"head_dim": 24}, torch.float32, None),  # 4 × 24 = 96 ≠ 64
    "llama3-rope": ({"rope_scaling": LLAMA3, "rope_theta": 5e5}, torch.bfloat16, None),
    "linear-rope": ({"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, torch.float32, None),
    "attention-bias": ({"attention_bias": True}, torch.float32, None),
    "eos-list": ({"eos_token_id": [2, 5, 7]}, torch.float32, None),
    "everything": ({"attention_bias": True, "head_dim": 8, "num_attention_heads": 8, "rope_scaling": LLAMA3,
                    "tie_word_embeddings": False, "eos_token_id": [2, 5]}, torch.bfloat16, "60KB"),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A real byte-level BPE tokenizer small enough for these vocabularies: export saves and checks one."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    text = (SHAKESPEARE / "val.txt").read_text(encoding="utf-8")[:20000]
    save_tokenizer(train_tokenizer([text], BASE["vocab_size"]), path)
    return path


def random_llama(changes: dict) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**BASE, **copy.deepcopy(changes)})).eval()  # it edits the dicts it gets
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    return model


def hugging_face_checkpoint(directory, changes: dict, dtype, shard: str | None, tokenizer_json) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (norms and biases random too, so that a misplaced one shows) saved as published;
    returns transformers' model read back from those files in float32, the reference."""
    model = random_llama(changes)
    model.to(dtype).save_pretrained(directory, max_shard_size=shard or "1GB")
    if isinstance(changes.get("eos_token_id"), list):
        GenerationConfig(bos_token_id=1, eos_token_id=changes["eos_token_id"], pad_token_id=0).save_pretrained(directory)
    (directory / "tokenizer.json").write_text(tokenizer_json.read_text(encoding="utf-8"), encoding="utf-8")
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, tmp_path_factory, tokenizer_json):
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    changes, dtype, shard = VARIANTS[request.param]
    reference = hugging_face_checkpoint(directory, changes, dtype, shard, tokenizer_json)
    return request.param, directory, reference


def test_the_files_are_as_published(variant):
    name, directory, _ = variant
    config = json.loads((directory / "config.json").read_text())
    _, dtype, shard = VARIANTS[name]
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert (directory / "model.safetensors.index.json").is_file() == (shard is not None)
    if shard:
        assert len(open_checkpoint(directory).weight_files) > 1


def test_our_model_matches_transformers_at_prefill_and_decode(variant):
    name, directory, reference = variant
    ours = load_model(directory)
    ids = torch.randint(0, BASE["vocab_size"], (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, past = ours(ids[:, :96])
        theirs = reference(ids[:, :96], use_cache=True)
        assert (logits - theirs.logits).abs().max() < logit_bound(theirs.logits), name
        for t in range(96, 100):  # positions past the llama3 variants' original context
            logits, past = ours(ids[:, t:t + 1], past_key_values=past)
            theirs = reference(ids[:, t:t + 1], cache=theirs.cache, use_cache=True)
            assert (logits - theirs.logits).abs().max() < logit_bound(theirs.logits), (name, t)


@pytest.mark.parametrize("name", ["llama3-rope", "linear-rope", "attention-bias"])
def test_each_feature_changes_the_logits(name):
    """The parity tests would also pass if a feature had no effect on these tiny models: make sure each one does."""
    changes = VARIANTS[name][0]
    with_feature = random_llama(changes)
    without = random_llama({key: value for key, value in changes.items()
                            if key not in ("rope_scaling", "attention_bias")})
    without.load_state_dict(with_feature.state_dict(), strict=False)  # the same weights, biases aside
    ids = torch.arange(3, 99)[None]
    with torch.no_grad():
        reference = with_feature(ids).logits
        assert (without(ids).logits - reference).abs().max() > 100 * logit_bound(reference)


def export_and_compare(name: str, directory, reference, graph: str, out) -> None:
    """Export (which checks the graph against our PyTorch model itself), then compare with transformers."""
    report = export(directory, out, fuse=graph == "fused")
    checks = report["checks"]
    assert checks["greedy_identical"] and checks["long_prefill_tokens"] == BASE["max_position_embeddings"]
    onnx_lm = OnnxLM(out / "model.onnx", open_checkpoint(directory).config)
    ids = np.random.default_rng(2).integers(0, BASE["vocab_size"], (1, 90))
    logits = onnx_lm.logits(ids)
    with torch.no_grad():
        theirs = reference(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(logits - theirs).max() < logit_bound(theirs), name
    exported = json.loads((out / "config.json").read_text())
    for key in ("attention_bias", "head_dim", "tie_word_embeddings"):
        assert exported[key] == getattr(reference.config, key), key
    assert exported["rope_scaling"] == VARIANTS[name][0].get("rope_scaling")


def test_fused_export_matches_pytorch_and_transformers(variant, tmp_path):
    export_and_compare(*variant, "fused", tmp_path / "onnx")


@pytest.mark.parametrize("variant", ["everything"], indirect=True)
def test_plain_export_matches_pytorch_and_transformers(variant, tmp_path):
    """The traced graph, on the variant with every feature (tracing takes longest)."""
    export_and_compare(*variant, "plain", tmp_path / "onnx")


def test_a_saved_config_round_trips_through_transformers(variant, tmp_path):
    """What we write (export's config.json, a saved checkpoint) is read by transformers as the same model."""
    name, directory, reference = variant
    from spj_edge.checkpoint import save_checkpoint

    ours = load_model(directory)
    save_checkpoint(tmp_path, ours, tokenizer=None)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(5, 100)[None]
    with torch.no_grad():
        expected = reference(ids).logits
        assert (again(ids).logits - expected).abs().max() < logit_bound(expected), name


def test_the_eos_list_is_kept_for_generation(tmp_path, tokenizer_json):
    hugging_face_checkpoint(tmp_path, VARIANTS["eos-list"][0], torch.float32, None, tokenizer_json)
    assert open_checkpoint(tmp_path).config.eos_token_id == 2  # the first, the one a text ends with
    assert GenerationConfig.from_pretrained(tmp_path).eos_token_id == [2, 5, 7]


@pytest.mark.parametrize("key, value, fragment", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling rope_type='yarn' is not supported"),
    ("rope_scaling", {"rope_type": "linear", "factor": 4.0, "beta_fast": 32},
     "rope_scaling key 'beta_fast' is not supported for rope_type 'linear'"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling of rope_type 'llama3' lacks"),
    ("mlp_bias", True, "mlp_bias=True is not supported"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("pretraining_tp", 2, "pretraining_tp=2 is not supported"),
])
def test_what_the_model_lacks_is_named_in_one_line(tmp_path, tokenizer_json, key, value, fragment):
    hugging_face_checkpoint(tmp_path / "hf", {}, torch.float32, None, tokenizer_json)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config[key] = value
    config.pop("rope_parameters")  # transformers 5's spelling of the same; the test edits the older one
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SPJError, match="config.json: "):
        open_checkpoint(tmp_path / "hf")
    assert_one_line_error(cli("export", "--model", tmp_path / "hf", "--out", tmp_path / "onnx"), fragment)


def test_a_shard_index_cannot_point_outside_the_checkpoint(tmp_path, tokenizer_json):
    hugging_face_checkpoint(tmp_path / "hf", {}, torch.float32, "40KB", tokenizer_json)
    index_path = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(SPJError, match="not a file name in the checkpoint"):
        open_checkpoint(tmp_path / "hf").weight_files
