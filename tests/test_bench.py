"""spj-edge bench: every figure present and consistent, the roofline recomputed independently, workers isolated, and
clear refusals before any worker starts."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import assert_one_line_error, run_cli
from spj_edge.bench import bench
from spj_edge.checkpoint import load_config, read_state_dict
from spj_edge.errors import SPJError
from spj_edge.export import export
from spj_edge.package import package

PROMPT, NEW = 8, 16
FIELDS = ("path", "kind", "file_bytes", "parameters", "threads", "decode_tokens_per_s", "decode_min_max", "prompt_ms",
          "prompt_min_max", "decode_runs", "prompt_ms_runs", "peak_rss_bytes", "torch_imported",
          "weight_bytes_per_token", "kv_bytes_per_token", "bytes_per_token", "roofline_tokens_per_s",
          "roofline_share")


@pytest.fixture(scope="module")
def models(nano_checkpoint, tmp_path_factory):
    dist = tmp_path_factory.mktemp("bench")
    export(nano_checkpoint, dist / "onnx")
    package(dist / "onnx", dist / "nano.spj")
    return {"onnx": dist / "onnx", "package": dist / "nano.spj", "torch": nano_checkpoint, "dir": dist}


@pytest.fixture(scope="module")
def result(models):
    out = models["dir"]
    labels = {str(models["onnx"]): "fp32 export", str(models["package"]): "fp32 package"}
    figures = bench([models["onnx"], models["package"]], [models["torch"]], prompt_tokens=PROMPT, new_tokens=NEW,
                    repetitions=2, json_out=out / "bench.json", chart=out / "bench.png", labels=labels,
                    quality={"fp32 export": 2.5})
    return figures, out


def kv_bytes_per_token(config) -> float:
    """float32 keys and values of every layer, at the run's mean position."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4 * (PROMPT + NEW / 2)


def onnx_bytes_per_token(path, config) -> float:
    """All initializers at their stored size; of the embedding table, which a Gather indexes, one row."""
    total = 0
    for tensor in onnx.load(str(path)).graph.initializer:
        array = numpy_helper.to_array(tensor)
        total += array[0].nbytes if tensor.name == "embed_tokens.weight" else array.nbytes
    return total + kv_bytes_per_token(config)


def torch_bytes_per_token(checkpoint, config) -> float:
    """float32 parameters: one embedding row, and the table again in full as the tied LM head."""
    state = read_state_dict(checkpoint)
    everything = sum(t.numel() for t in state.values()) * 4
    embedding = state["model.embed_tokens.weight"]
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    return everything + embedding[0].numel() * 4 + kv_bytes_per_token(config)


def test_every_row_and_figure(result, models):
    figures, out = result
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(figures))
    rows = figures["models"]
    assert list(rows) == ["fp32 export", "fp32 package", str(models["torch"])]
    assert figures["machine"]["bandwidth_gb_s"] > 0.1 and figures["machine"]["threads"] >= 1
    assert figures["settings"]["prompt_tokens"] == PROMPT and figures["settings"]["new_tokens"] == NEW
    for name, row in rows.items():
        assert all(field in row for field in FIELDS), (name, set(FIELDS) - set(row))
        assert len(row["decode_runs"]) == len(row["prompt_ms_runs"]) == 2
        low, high = row["decode_min_max"]
        assert 0 < low <= row["decode_tokens_per_s"] <= high, name
        low, high = row["prompt_min_max"]
        assert 0 < low <= row["prompt_ms"] <= high, name
        assert 0 < row["roofline_share"] <= 1.5, (name, row["roofline_share"])
        assert row["file_bytes"] < row["peak_rss_bytes"] < 3e9, name
        assert row["parameters"] == load_config(models["torch"]).num_parameters()
    assert rows["fp32 export"]["bits_per_byte"] == 2.5 and "bits_per_byte" not in rows["fp32 package"]
    assert rows["fp32 export"]["kind"] == "onnx" and rows["fp32 package"]["kind"] == "package"
    assert rows["fp32 export"]["file_bytes"] == (models["onnx"] / "model.onnx").stat().st_size


def test_onnx_workers_never_import_torch(result, models):
    rows = result[0]["models"]
    assert rows["fp32 export"]["torch_imported"] is False
    assert rows["fp32 package"]["torch_imported"] is False
    assert rows[str(models["torch"])]["torch_imported"] is True


def test_roofline_is_bandwidth_over_bytes_per_token(result, models):
    figures, _ = result
    bandwidth = figures["machine"]["bandwidth_gb_s"] * 1e9
    config = load_config(models["torch"])
    expected = {"fp32 export": onnx_bytes_per_token(models["onnx"] / "model.onnx", config),
                "fp32 package": onnx_bytes_per_token(models["package"] / "model.onnx", config),
                str(models["torch"]): torch_bytes_per_token(models["torch"], config)}
    for name, bytes_per_token in expected.items():
        row = figures["models"][name]
        assert row["bytes_per_token"] == pytest.approx(bytes_per_token, rel=1e-9), name
        assert row["roofline_tokens_per_s"] == pytest.approx(bandwidth / bytes_per_token, rel=1e-9), name
        assert row["roofline_share"] == pytest.approx(row["decode_tokens_per_s"] / row["roofline_tokens_per_s"])


def test_chart_is_a_png(result):
    chart = result[1] / "bench.png"
    data = chart.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(chart.parent.glob(".bench.png.tmp-*"))


def test_refusals_before_any_worker(models, tmp_path):
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["onnx"], corrupt)
    (corrupt / "model.onnx").write_bytes(b"\x08\x07 not protobuf" * 10)
    cases = [
        (dict(models=[tmp_path / "empty"]), "not a model to benchmark"),
        (dict(models=[models["torch"]]), "give it with --torch"),
        (dict(models=[], torch_checkpoints=[models["onnx"]]), "not a PyTorch checkpoint"),
        (dict(models=[corrupt]), "not a valid ONNX model"),
        (dict(models=[models["onnx"]], repetitions=0), "repetitions must be ≥ 1"),
        (dict(models=[models["onnx"]], new_tokens=0), "new_tokens must be ≥ 2"),
        (dict(models=[models["onnx"]], prompt_tokens=120, new_tokens=9), "context of 128 tokens"),
        (dict(models=[models["onnx"]], quality={"other": 1.0}), "not benchmarked"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(SPJError, match=fragment):
            bench(**kwargs)


def test_a_failing_worker_names_its_model(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["torch"], broken, ignore=shutil.ignore_patterns("train_state"))
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(SPJError, match=f"^{broken}: .*safetensors"):
        bench([], [broken], prompt_tokens=4, new_tokens=4, repetitions=1)


def test_cli_one_line_errors(models, tmp_path):
    assert_one_line_error(run_cli("bench", "--model", tmp_path / "missing"), "missing", "no such file")
    assert_one_line_error(run_cli("bench", "--model", models["onnx"], "--prompt-tokens", "200"),
                          str(models["onnx"]), "context of 128 tokens")
