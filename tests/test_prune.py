"""Structured pruning: identity at ratio 0, importance ranking, physically smaller checkpoints that transformers and the
exporter accept, the unstructured comparison, and bad flags."""
import copy
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import UD, assert_one_line_error, cli, logit_bound
from spj_edge.checkpoint import load_checkpoint, load_model
from spj_edge.export import export
from spj_edge.options import PruneOptions
from spj_edge.prune import activation_importance, calibration_split, l1_importance, prune, prune_model
from spj_edge.tokenizer import token_byte_lengths
from spj_edge.train import heldout_metrics


@pytest.fixture(scope="module")
def nano(nano_checkpoint, small_corpus):
    model, tokenizer = load_checkpoint(nano_checkpoint)
    calib, _ = calibration_split(small_corpus[1:3], tokenizer, model.config.max_position_embeddings)
    return model, calib[:16]


@pytest.fixture(scope="module")
def pruned_dir(nano_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "half"
    report = prune(nano_checkpoint, out, calib=[UD / "en_ewt_dev.txt"],
                   options=PruneOptions(ffn_ratio=0.5, head_ratio=0.5, importance="activation"))
    return out, report


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("importance", ["activation", "l1"])
def test_ratio_zero_is_the_identity_and_a_real_ratio_is_not(nano, importance):
    model, calib = nano
    same, _ = prune_model(model, PruneOptions(0.0, 0.0, importance), calib)
    assert same.config == model.config
    assert torch.equal(logits(same, IDS), logits(model, IDS))
    smaller, _ = prune_model(model, PruneOptions(0.25, 0.0, importance), calib)
    assert smaller.config.intermediate_size == 144  # 176 · 0.75 = 132, rounded up to a multiple of 16
    assert not torch.allclose(logits(smaller, IDS), logits(model, IDS))


@pytest.mark.parametrize("importance", ["activation", "l1"])
def test_a_zeroed_channel_and_a_zeroed_head_rank_last_and_go_first(nano, importance):
    model, calib = nano
    model = copy.deepcopy(model)  # a copy to damage
    layer = model.layers[1]
    head_dim = model.config.head_dim
    with torch.no_grad():
        layer.mlp.gate_proj.weight[37] = 0
        layer.mlp.up_proj.weight[37] = 0
        layer.mlp.down_proj.weight[:, 37] = 0
        layer.self_attn.q_proj.weight[3 * head_dim:4 * head_dim] = 0
        layer.self_attn.o_proj.weight[:, 3 * head_dim:4 * head_dim] = 0
    ffn, heads = activation_importance(model, calib) if importance == "activation" else l1_importance(model)
    assert ffn[1].argmin() == 37 and ffn[1][37] == 0 and (ffn[1] > 0).sum() == 175
    assert heads[1].argmin() == 3 and heads[1][3] == 0
    # remove exactly one channel (no rounding) and one query head per KV group
    pruned, details = prune_model(model, PruneOptions(1 / 176, 0.5, importance, multiple=1), calib)
    assert pruned.config.intermediate_size == 175 and pruned.config.num_attention_heads == 2
    assert details["layers"][1]["heads_removed"][-1] == 3 and len(details["layers"][1]["heads_removed"]) == 2
    # the zeroed channel contributed nothing, so its removal leaves layer 1's MLP output unchanged
    kept = torch.cat((torch.arange(37), torch.arange(38, 176)))
    torch.testing.assert_close(pruned.layers[1].mlp.down_proj.weight, model.layers[1].mlp.down_proj.weight[:, kept])
    x = torch.randn(3, model.config.hidden_size)
    torch.testing.assert_close(pruned.layers[1].mlp(x), model.layers[1].mlp(x))



def test_heads_of_a_model_with_attention_biases_prune_as_zeroed_outputs(nano):
    """Qwen-style Llama checkpoints carry q/k/v/o biases. Removing query heads must take q's bias rows with them:
    the pruned model computes what the original does with those heads' o_proj columns zeroed."""
    from spj_edge.model import Transformer

    model, calib = nano
    torch.manual_seed(0)
    biased = Transformer(model.config.replace(attention_bias=True)).eval()
    with torch.no_grad():
        for layer in biased.layers:
            for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, projection).bias.normal_(0, 0.5)
    pruned, details = prune_model(biased, PruneOptions(0.0, 0.5, "l1"), calib)
    assert pruned.config.num_attention_heads == biased.config.num_attention_heads // 2
    zeroed = copy.deepcopy(biased)
    head_dim = biased.config.head_dim
    with torch.no_grad():
        for layer, removed in zip(zeroed.layers, details["layers"]):
            for head in removed["heads_removed"]:
                layer.self_attn.o_proj.weight[:, head * head_dim:(head + 1) * head_dim] = 0
    reference = logits(zeroed, IDS)
    assert (logits(pruned, IDS) - reference).abs().max() <= logit_bound(reference)
    assert (logits(biased, IDS) - reference).abs().max() > 100 * logit_bound(reference)  # the heads did matter

def test_pruned_checkpoint_loads_in_transformers_with_the_same_logits(pruned_dir):
    out, report = pruned_dir
    ours = load_model(out)
    cfg = ours.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (96, 2, 2)
    assert cfg.head_dim == 16  # kept from the source, not hidden_size / heads
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    assert hf.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    with torch.no_grad():
        reference = hf(IDS).logits
    assert (logits(ours, IDS) - reference).abs().max() < logit_bound(reference)

    params, size, heldout = report["parameters"], report["file_bytes"], report["heldout"]
    assert params["after"] == cfg.num_parameters() < params["before"]
    assert size["after"] == (out / "model.safetensors").stat().st_size < size["before"]
    # the figures are of the checkpoint written, on text the calibration did not see
    _, tokenizer = load_checkpoint(out)
    _, windows = calibration_split([UD / "en_ewt_dev.txt"], tokenizer, cfg.max_position_embeddings)
    lengths = torch.from_numpy(token_byte_lengths(tokenizer, cfg.vocab_size))
    assert heldout["after"] == heldout_metrics(ours, windows, lengths, 8)
    assert heldout["after"]["bits_per_byte"] != heldout["before"]["bits_per_byte"]
    assert json.loads((out / "report.json").read_text())["removed"]["intermediate_size"] == [176, 96]


@pytest.mark.parametrize("fuse", [False, True])
def test_pruned_checkpoint_exports_and_matches_pytorch(pruned_dir, tmp_path, fuse):
    out, _ = pruned_dir
    report = export(out, tmp_path / "onnx", opset=17, fuse=fuse)  # verifies the graph against PyTorch itself
    assert report["parameters"] == load_model(out).config.num_parameters()
    assert report["checks"]["greedy_identical"]


def test_magnitude_pruning_zeroes_weights_and_says_it_shrinks_nothing(nano_checkpoint, tmp_path):
    report = prune(nano_checkpoint, tmp_path / "sparse", options=PruneOptions(ffn_ratio=0.5, method="magnitude"))
    model, sparse = load_model(nano_checkpoint), load_model(tmp_path / "sparse")
    assert sparse.config == model.config
    down = sparse.layers[0].mlp.down_proj.weight
    assert (down == 0).sum() == down.numel() // 2
    # the survivors are the largest weights, unchanged
    original = model.layers[0].mlp.down_proj.weight
    assert original[down == 0].abs().max() <= original[down != 0].abs().min()
    assert torch.equal(sparse.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)
    params = report["parameters"]
    assert params["after"] == params["before"] and params["nonzero_after"] < params["before"]
    assert report["file_bytes"]["after"] == report["file_bytes"]["before"]
    assert "shrinks nothing and speeds nothing on ONNX Runtime's CPU kernels" in report["removed"]["note"]


# These go through the CLI (`spj-edge prune`).
@pytest.mark.parametrize("args, message", [
    (["--ffn-ratio", "1.0"], "--ffn-ratio must be in [0, 1) (the fraction to remove), got 1.0"),
    (["--ffn-ratio", "-0.1"], "--ffn-ratio must be in [0, 1)"),
    (["--ffn-ratio", "0.5", "--head-ratio", "1"], "--head-ratio must be in [0, 1)"),
    (["--ffn-ratio", "0.5", "--importance", "taylor"], "--importance must be one of activation, l1, got 'taylor'"),
    (["--ffn-ratio", "0.5"], "--importance activation needs calibration text"),
    (["--ffn-ratio", "0.5", "--method", "random"], "--method must be one of structured, magnitude"),
])
def test_bad_flags_are_one_line_exit_2_and_nothing_written(nano_checkpoint, tmp_path, args, message):
    out = tmp_path / "out"
    result = cli("prune", "--model", nano_checkpoint, *args, "--out", out)
    assert_one_line_error(result, message)
    assert not list(tmp_path.iterdir())
