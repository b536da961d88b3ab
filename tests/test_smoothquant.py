"""Static int8's smoothing (spj_edge/smoothquant.py): every fold leaves the float model's function as it was, and an
outlier channel of the kind real LMs have is found in the calibration statistics and absorbed by the smoothing."""
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import UD, logit_bound
from spj_edge import smoothquant
from spj_edge.data import calibration_split, spaced_windows
from spj_edge.export import export
from spj_edge.onnx_lm import OnnxLM
from spj_edge.options import QuantizeOptions
from spj_edge.quantize import (DECODE, PREFILL, KVCacheCalibration, Recipe, calibration_activations, float_export,
                               float_reference, load_profile, quantize, scaling_plan, statistics_inputs, weight_matmuls)

DOWN = "/layers.0/mlp/down_proj/MatMul"


@pytest.fixture(scope="module")
def fused(nano_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("smooth") / "fused"
    export(nano_checkpoint, out, opset=17)
    return out


def statistics_of(directory, tmp_path, recipe):
    tmp_path.mkdir(exist_ok=True)
    model = float_export(directory)
    stream, _ = calibration_split([UD / "en_ewt_dev.txt", UD / "de_gsd_dev.txt"], model.tokenizer)
    windows, inputs = spaced_windows(stream, PREFILL + DECODE, 8), statistics_inputs(recipe, model.proto)
    statistics = smoothquant.ActivationStatistics.collect(
        calibration_activations(float_reference(model, recipe, tmp_path), windows, inputs), inputs,
        tokens=sum(map(len, windows)))
    return model, statistics


def plan_of(directory, tmp_path, alpha=None):
    # x86's profile: 8-bit blocks only where per-tensor int8 is estimated to break (x86-vnni's gives them to every MatMul)
    recipe = Recipe.of(QuantizeOptions(smoothquant=alpha, measure=False, target="x86"))
    model, statistics = statistics_of(directory, tmp_path, recipe)
    return scaling_plan(model, statistics, recipe, weight_matmuls(model.proto), tmp_path)


def test_every_weight_matmul_has_a_fold_and_smoothing_keeps_the_function(fused, tmp_path):
    model = float_export(fused)
    found = smoothquant.folds(model.proto, model.config)
    layers = model.config.num_hidden_layers
    assert set(found) == set(weight_matmuls(model.proto)) and len(found) == 4 * layers + 1
    assert found["/layers.0/self_attn/o_proj/MatMul"].heads == (
        model.config.num_key_value_heads, model.config.num_attention_heads // model.config.num_key_value_heads,
        model.config.head_dim)
    plan, smoothed, _ = plan_of(fused, tmp_path, alpha=0.5)
    assert all(a == 0.5 for n, a in plan.alpha.items() if n not in plan.kept)
    window = spaced_windows(calibration_split([UD / "fr_gsd_dev.txt"], model.tokenizer)[0], 64, 1)[0]
    reference = OnnxLM(model.graph_path, model.config).window_logits(window)
    logits = OnnxLM(smoothed, model.config).window_logits(window)
    # the weights really changed: every smoothed MatMul's B, and the norms, V and up columns its 1/s went into
    before = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in onnx.load(smoothed).graph.initializer}
    changed = [n for n in before if not np.array_equal(before[n], after[n])]
    assert len(changed) >= len([n for n in plan.alpha if n not in plan.kept])
    # s multiplies a weight row and divides its source: the same product, rounded once more each side in float32
    assert np.abs(logits - reference).max() <= logit_bound(reference)


@pytest.fixture
def planted(fused, tmp_path):
    """Channel c of layer 0's FFN made 256x larger (its `up` column ×256, its `down` row ÷256: the same function, in
    float, up to rounding), as real LMs' `down_proj` inputs are."""
    planted = tmp_path / "planted"
    shutil.copytree(fused, planted)
    proto = onnx.load(planted / "model.onnx")
    weights = {i.name: i for i in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    model = float_export(fused)
    gate_up = weights[nodes["/layers.0/mlp/gate_up_proj/MatMul"].input[1]]
    down = weights[nodes[DOWN].input[1]]
    w_up, w_down = numpy_helper.to_array(gate_up).copy(), numpy_helper.to_array(down).copy()
    c, ffn = 5, model.config.intermediate_size
    w_up[:, ffn + c] *= 256
    w_down[c] /= 256
    gate_up.CopyFrom(numpy_helper.from_array(w_up, gate_up.name))
    down.CopyFrom(numpy_helper.from_array(w_down, down.name))
    onnx.save(proto, planted / "model.onnx")
    return planted


def test_an_outlier_channel_is_absorbed_by_smoothing(planted, tmp_path):
    """Without smoothing the int8 estimate of the planted MatMul's output blows up and it would get 8-bit blocks; with
    it, per-tensor static int8 is fine."""
    smoothed_plan, _, _ = plan_of(planted, tmp_path / "a")
    plain_plan, _, _ = plan_of(planted, tmp_path / "b", alpha=0)
    assert plain_plan.error[DOWN] > load_profile("x86").blockwise_above and DOWN in plain_plan.kept
    assert smoothed_plan.alpha[DOWN] > 0 and DOWN not in smoothed_plan.kept
    assert smoothed_plan.error[DOWN] < plain_plan.error[DOWN] / 4


def test_8_bit_blocks_are_smoothed_for_their_own_rounding(planted, tmp_path):
    """x86-vnni gives every MatMul 8-bit blocks, whose input is rounded to int8 per block as the kernel runs: the
    planted channel leaves the other inputs of its block a few levels, so the plan scales it by the estimate for
    blocks (not per-tensor int8's), which falls, and that scale is the one applied."""
    recipe = Recipe.of(QuantizeOptions(measure=False, target="x86-vnni"))
    model, statistics = statistics_of(planted, tmp_path, recipe)
    found = smoothquant.folds(model.proto, model.config)
    mode = smoothquant.eight_bit_blocks(recipe.eight_bit_block_size)
    scaled = smoothquant.plan(model.proto, statistics, found, [DOWN], mode)
    plain = smoothquant.plan(model.proto, statistics, found, [DOWN], mode, alpha=0)
    assert scaled.alpha[DOWN] > 0 and scaled.error[DOWN] < plain.error[DOWN] / 2
    plan, _, _ = scaling_plan(model, statistics, recipe, weight_matmuls(model.proto), tmp_path)
    assert DOWN in plan.kept and plan.alpha[DOWN] == scaled.alpha[DOWN]
    assert np.array_equal(plan.scales[DOWN], scaled.scales[DOWN])


def test_int4_s_8_bit_matmuls_are_smoothed_for_their_blocks(planted, tmp_path):
    """int4 too: a MatMul sent to 8-bit blocks (here as kept_grids sends a Q8_0 grid) takes the scale the estimate
    for blocks chooses, not the one AWQ chose for 4 bits."""
    recipe = Recipe.of(QuantizeOptions(mode="int4", measure=False, target="x86-vnni"))
    model, statistics = statistics_of(planted, tmp_path, recipe)
    found = smoothquant.folds(model.proto, model.config)
    blocks = smoothquant.plan(model.proto, statistics, found, [DOWN],
                              smoothquant.eight_bit_blocks(recipe.eight_bit_block_size))
    awq = smoothquant.plan(model.proto, statistics, found, [DOWN], smoothquant.int4(recipe.options.block_size))
    # blocks: 0.25 or 0.5 (errors 0.0029, 0.0029); AWQ for 4 bits: 0.75 (0.031, next 0.040)
    assert blocks.alpha[DOWN] > 0 and blocks.alpha[DOWN] != awq.alpha[DOWN]
    plan, _, _ = scaling_plan(model, statistics, recipe, weight_matmuls(model.proto), tmp_path,
                              eight_bit={DOWN: "its 8-bit grid"})
    assert plan.kept[DOWN] == "its 8-bit grid" and plan.alpha[DOWN] == blocks.alpha[DOWN]
    assert np.array_equal(plan.scales[DOWN], blocks.scales[DOWN])


def test_what_static_int8_would_break_gets_8_bit_block_weights(planted, tmp_path):
    """Unsmoothed, the planted MatMul's per-tensor int8 estimate is too high: it becomes an 8-bit MatMulNBits (block
    scales, activations rounded per block as it runs), named with its reason, and the model passes the gate."""
    options = QuantizeOptions(smoothquant=0, calib_samples=8, eval_windows=8, measure=False, target="x86",
                              int8_block_size=64)
    report = quantize(planted, tmp_path / "int8", calib=[UD / "en_ewt_dev.txt", UD / "de_gsd_dev.txt"],
                      eval_data=[UD / "fr_gsd_dev.txt"], options=options)
    assert list(report["eight_bit"]) == [DOWN] and "int8 error" in report["eight_bit"][DOWN]
    assert report["executed"]["integer_ops"]["MatMulNBits"] == 1 and not report["executed"]["float_weight_matmuls"]
    assert report["gate"]["passed"] and DOWN in report["quantized"]
    graph = onnx.load(tmp_path / "int8" / "model.onnx").graph
    (written,) = ({a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits")
    # --int8-block-size over the profile's 32
    assert written["bits"] == 8 and written["block_size"] == report["settings"]["eight_bit_block_size"] == 64


def test_awq_scaling_lowers_the_int4_estimate(planted, tmp_path):
    """4-bit weights alone, activations float: the planted `down` row is 1/256 of its block's largest and rounds to
    zero (under half a step of 1/8), losing the channel that carries the most signal; AWQ's scale (mean |x_c|^α)
    trades the other rows' precision for it, and the estimate picks an α that lowers the output's error."""
    recipe = Recipe.of(QuantizeOptions(mode="int4", measure=False))
    model, statistics = statistics_of(planted, tmp_path, recipe)
    found, matmuls = smoothquant.folds(model.proto, model.config), weight_matmuls(model.proto)
    mode = smoothquant.int4(recipe.options.block_size)
    awq = smoothquant.plan(model.proto, statistics, found, matmuls, mode)
    plain = smoothquant.plan(model.proto, statistics, found, matmuls, mode, alpha=0)
    w = numpy_helper.to_array({i.name: i for i in model.proto.graph.initializer}[
        next(n for n in model.proto.graph.node if n.name == DOWN).input[1]])
    assert not smoothquant.int4_weight(w, recipe.options.block_size)[5].any()
    assert awq.alpha[DOWN] > 0 and awq.error[DOWN] < plain.error[DOWN]
    assert all(awq.error[n] <= plain.error[n] for n in matmuls)  # α = 0 is always a candidate


def test_statistics_in_one_pass_see_what_the_cached_feeds_give(fused):
    """calibration_activations builds each sample's cache as it steps; onnxruntime's calibrator (the --op-types
    experiments) is fed the same steps from stored caches. Both must show the statistics the same tensors."""
    model = float_export(fused)
    recipe = Recipe.of(QuantizeOptions(measure=False))
    lm = float_reference(model, recipe, fused.parent)
    inputs = statistics_inputs(recipe, model.proto)
    windows = spaced_windows(calibration_split([UD / "es_gsd_dev.txt"], model.tokenizer)[0], PREFILL + DECODE, 2)
    one_pass = list(calibration_activations(lm, windows, inputs))
    feeds = list(iter(KVCacheCalibration(lm, windows).get_next, None))
    assert len(one_pass) == len(feeds) == 2 * (1 + DECODE)
    for step, feed in zip(one_pass, feeds):
        for name, value in zip(inputs, lm.session.run(inputs, feed)):
            # the same graph on the same inputs: only the cache's copy differs, not one float operation
            np.testing.assert_array_equal(step[name], value)
