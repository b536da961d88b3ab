"""spj-edge bench: every figure present and consistent, the roofline recomputed independently, a share shown only when
it can be trusted, a chart whose names sit at their own points, workers isolated, and clear refusals before any worker
starts."""
import json
import math
import os
import shutil

import onnx
import pytest
from matplotlib.text import Text
from onnx import numpy_helper

from conftest import assert_one_line_error, cli
from spj_edge.bench import KINDS, MAX_SPREAD, bench, cache_bytes, chart_figure, print_result, roofline
from spj_edge.artifact import open_checkpoint
from spj_edge.checkpoint import read_state_dict
from spj_edge.errors import SPJError
from spj_edge.options import BenchOptions

PROMPT, NEW = 8, 16
FIELDS = ("path", "kind", "file_bytes", "parameters", "threads", "decode_tokens_per_s", "decode_min_max", "prompt_ms",
          "prompt_min_max", "decode_runs", "prompt_ms_runs", "peak_rss_bytes", "torch_imported",
          "weight_bytes_per_token", "kv_bytes_per_token", "bytes_per_token", "memory_bytes_per_token",
          "roofline_tokens_per_s", "roofline_share", "roofline_warning")
REPETITIONS = 2


@pytest.fixture(scope="module")
def models(nano_checkpoint, nano_export, nano_package, tmp_path_factory):
    """The session's nano as a checkpoint, an export and a package (conftest); "dir": where this module writes."""
    return {"onnx": nano_export, "package": nano_package, "torch": nano_checkpoint,
            "dir": tmp_path_factory.mktemp("bench")}


@pytest.fixture(scope="module")
def result(models):
    out = models["dir"]
    labels = {str(models["onnx"]): "fp32 export", str(models["package"]): "fp32 package"}
    figures = bench([models["onnx"], models["package"]], [models["torch"]],
                    options=BenchOptions(prompt_tokens=PROMPT, new_tokens=NEW, repetitions=REPETITIONS),
                    json_out=out / "bench.json", chart=out / "bench.png", labels=labels, quality={"fp32 export": 2.5})
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
    state = read_state_dict(open_checkpoint(checkpoint).weight_files)
    everything = sum(t.numel() for t in state.values()) * 4
    embedding = state["model.embed_tokens.weight"]
    assert config.tie_word_embeddings and "lm_head.weight" not in state
    return everything + embedding[0].numel() * 4 + kv_bytes_per_token(config)


def test_every_row_and_figure(result, models):
    figures, out = result
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(figures))
    rows = figures["models"]
    assert list(rows) == ["fp32 export", "fp32 package", str(models["torch"])]
    machine = figures["machine"]
    assert machine["threads"] >= 1 and machine["cache_bytes"] > 0
    # one bandwidth measurement in every round, beside the models' repetitions
    assert len(machine["bandwidth_runs"]) == REPETITIONS and min(machine["bandwidth_runs"]) > 0.1
    assert machine["bandwidth_min_max"] == [min(machine["bandwidth_runs"]), max(machine["bandwidth_runs"])]
    assert machine["bandwidth_min_max"][0] <= machine["bandwidth_gb_s"] <= machine["bandwidth_min_max"][1]
    assert figures["settings"]["prompt_tokens"] == PROMPT and figures["settings"]["new_tokens"] == NEW
    for name, row in rows.items():
        assert all(field in row for field in FIELDS), (name, set(FIELDS) - set(row))
        assert len(row["decode_runs"]) == len(row["prompt_ms_runs"]) == REPETITIONS
        low, high = row["decode_min_max"]
        assert 0 < low <= row["decode_tokens_per_s"] <= high, name
        low, high = row["prompt_min_max"]
        assert 0 < low <= row["prompt_ms"] <= high, name
        # a share is shown, and then can only be under the bound, or there is a warning that says why not
        assert (row["roofline_share"] is None) == bool(row["roofline_warning"]), name
        assert row["roofline_share"] is None or 0 < row["roofline_share"] <= 1, name
        assert row["file_bytes"] < row["peak_rss_bytes"] < 3e9, name
        assert row["parameters"] == open_checkpoint(models["torch"]).config.num_parameters()
    assert rows["fp32 export"]["bits_per_byte"] == 2.5 and "bits_per_byte" not in rows["fp32 package"]
    assert rows["fp32 export"]["kind"] == "onnx" and rows["fp32 package"]["kind"] == "package"
    assert rows["fp32 export"]["file_bytes"] == (models["onnx"] / "model.onnx").stat().st_size


def test_onnx_workers_never_import_torch(result, models):
    rows = result[0]["models"]
    assert rows["fp32 export"]["torch_imported"] is False
    assert rows["fp32 package"]["torch_imported"] is False
    assert rows[str(models["torch"])]["torch_imported"] is True


def test_roofline_is_bandwidth_over_bytes_from_memory(result, models):
    figures, _ = result
    machine = figures["machine"]
    bandwidth, cache = machine["bandwidth_gb_s"] * 1e9, machine["cache_bytes"]
    config = open_checkpoint(models["torch"]).config
    expected = {"fp32 export": onnx_bytes_per_token(models["onnx"] / "model.onnx", config),
                "fp32 package": onnx_bytes_per_token(models["package"] / "model.onnx", config),
                str(models["torch"]): torch_bytes_per_token(models["torch"], config)}
    for name, bytes_per_token in expected.items():
        row = figures["models"][name]
        assert row["bytes_per_token"] == pytest.approx(bytes_per_token, rel=1e-9), name
        if bytes_per_token <= cache:  # nano, on any CPU with a few hundred KB of cache: no memory bound
            assert row["memory_bytes_per_token"] == 0 and row["roofline_tokens_per_s"] is None, name
            assert row["roofline_share"] is None and "cache" in row["roofline_warning"], name
            continue
        memory_bytes = bytes_per_token - cache
        assert row["memory_bytes_per_token"] == pytest.approx(memory_bytes, rel=1e-9), name
        assert row["roofline_tokens_per_s"] == pytest.approx(bandwidth / memory_bytes, rel=1e-9), name
        if row["roofline_share"] is not None:
            assert row["roofline_share"] == pytest.approx(row["decode_tokens_per_s"] / row["roofline_tokens_per_s"])


def test_a_share_is_shown_only_when_it_can_be_trusted():
    steady_bandwidth, steady_rates = [20.0, 21.0, 20.5], [100.0, 104.0, 98.0]
    mb = 1e6
    shown = roofline("m", 150 * mb, 50 * mb, steady_bandwidth, steady_rates)
    assert shown["memory_bytes_per_token"] == 100 * mb and shown["roofline_tokens_per_s"] == pytest.approx(205)
    assert shown["roofline_share"] == pytest.approx(100 / 205) and shown["roofline_warning"] is None

    refused = {  # what each case's warning must say
        "cache": roofline("m", 7 * mb, 32 * mb, steady_bandwidth, steady_rates),
        "memory bandwidth varied from 16.1 to 24.0 GB/s": roofline("m", 150 * mb, 0, [16.1, 22.7, 24.0],
                                                                   steady_rates),
        "m: its decode speed varied from 60.0 to 104.0": roofline("m", 150 * mb, 0, steady_bandwidth,
                                                                  [100.0, 104.0, 60.0]),
        "m: measured at 102%": roofline("m", 150 * mb, 50 * mb, steady_bandwidth, [209.0, 210.0, 205.0]),
    }
    for fragment, row in refused.items():
        assert row["roofline_share"] is None and fragment in row["roofline_warning"], (fragment, row)
    # at the threshold itself a spread is still shown
    assert roofline("m", 150 * mb, 0, [20.0, 20.0 * MAX_SPREAD], steady_rates)["roofline_share"] is not None


def test_the_table_prints_a_dash_and_each_warning_once(result, capsys):
    figures = json.loads(json.dumps(result[0]))
    rows = list(figures["models"].values())
    for row in rows:  # every row refused for the same machine-wide reason
        row["roofline_share"], row["roofline_warning"] = None, "the memory bandwidth varied"
    rows[0]["roofline_warning"] = "first: its decode speed varied"
    print_result(figures)
    err = capsys.readouterr().err
    assert " %" not in err  # no share printed
    warnings = [line for line in err.splitlines() if line.startswith("spj-edge: warning: ")]
    assert warnings == ["spj-edge: warning: first: its decode speed varied",
                        "spj-edge: warning: the memory bandwidth varied"]


def test_cache_grows_with_the_threads_that_use_it():
    one, every = cache_bytes(1), cache_bytes(len(os.sched_getaffinity(0)))
    assert 0 < one <= every


def chart_result(points: dict[str, tuple[str, float, float, float | None]]) -> dict:
    """What bench returns, as far as the chart reads it: name → (kind, MB, tokens/s, bits per byte)."""
    return {"machine": {"threads": 1, "bandwidth_gb_s": 20.0, "bandwidth_min_max": [19.0, 21.0]},
            "settings": {"prompt_tokens": 32, "new_tokens": 128},
            "models": {name: {"kind": kind, "file_bytes": mb * 1e6, "decode_tokens_per_s": rate,
                              "decode_min_max": [0.97 * rate, 1.03 * rate],
                              **({} if bpb is None else {"bits_per_byte": bpb})}
                       for name, (kind, mb, rate, bpb) in points.items()}}


# The demo's stages as the issue saw them: pruned (bpb 3.44) a little slower than pruned-recovered, at the same size,
# and the int8 export and its package at the same size too. The old chart labelled the pruned point pruned-recovered.
DEMO = {"teacher": ("torch", 21.9, 900.0, 3.10), "student": ("torch", 9.4, 2100.0, 3.30),
        "pruned": ("torch", 6.9, 2400.0, 3.44), "pruned-recovered": ("torch", 6.9, 2440.0, 3.35),
        "onnx-fp32": ("onnx", 9.9, 2300.0, 3.35), "int8": ("onnx", 2.6, 5281.0, 3.37),
        "package": ("package", 2.6, 4211.0, None)}
CROWD = {f"model {i}": (kind, 5.0, 1000.0 + 5 * i, None) for i, kind in enumerate(["torch", "onnx", "package"] * 3)}


def distance(point, box) -> float:
    """Pixels from a point to a rectangle (0 inside it)."""
    return math.hypot(max(box.x0 - point[0], 0, point[0] - box.x1), max(box.y0 - point[1], 0, point[1] - box.y1))


@pytest.mark.parametrize("points", [DEMO, CROWD], ids=["demo", "crowd"])
def test_chart_names_sit_at_their_own_points(points):
    fig = chart_figure(chart_result(points))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = {t.get_text(): t for t in ax.texts}
    assert set(labels) == set(points)
    pixels = {name: ax.transData.transform((mb, rate)) for name, (_, mb, rate, _) in points.items()}
    boxes = {name: Text.get_window_extent(label, renderer) for name, label in labels.items()}  # the text alone
    for name, label in labels.items():
        assert label.xy == (points[name][1], points[name][2]), name  # anchored at its own point
        nearest = min(pixels, key=lambda other: distance(pixels[other], boxes[name]))
        if nearest != name:  # then a line must lead from the name to its point
            assert label.arrow_patch is not None, (name, "is nearest to", nearest)
    for a in boxes:
        for b in boxes:
            assert a == b or not boxes[a].overlaps(boxes[b]), (a, b)
    # the names keep the vertical order of the points they belong to, among those in one column
    column = sorted((n for n in points if points[n][1] == 5.0 or points[n][1] == 6.9), key=lambda n: points[n][2])
    heights = [boxes[n].y0 for n in column]
    assert heights == sorted(heights)


def test_chart_gives_each_kind_its_marker_and_a_legend():
    fig = chart_figure(chart_result(DEMO))
    ax = fig.axes[0]
    paths = {}
    for kind in KINDS:
        collections = [c for c in ax.collections if c.get_gid() == kind]
        drawn = sorted(tuple(p) for c in collections for p in c.get_offsets())
        assert drawn == sorted((mb, rate) for k, mb, rate, _ in DEMO.values() if k == kind), kind
        paths[kind] = {c.get_paths()[0].vertices.round(6).tobytes() for c in collections}
        assert len(paths[kind]) == 1, kind  # one marker for the whole kind, with or without bits per byte
    assert len(set.union(*paths.values())) == len(KINDS)  # and no two kinds share one
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [label for _, label in KINDS.values()]


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
        (dict(models=[models["onnx"]], options=dict(repetitions=0)), "repetitions must be ≥ 1"),
        (dict(models=[models["onnx"]], options=dict(new_tokens=0)), "new_tokens must be ≥ 2"),
        (dict(models=[models["onnx"]], options=dict(prompt_tokens=120, new_tokens=9)), "context of 128 tokens"),
        (dict(models=[models["onnx"]], quality={"other": 1.0}), "not benchmarked"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(SPJError, match=fragment):
            options = BenchOptions(**kwargs.pop("options", {}))
            bench(**kwargs, options=options)


def test_a_failing_worker_names_its_model(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["torch"], broken, ignore=shutil.ignore_patterns("train_state"))
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(SPJError, match=f"^{broken}: .*safetensors"):
        bench([], [broken], options=BenchOptions(prompt_tokens=4, new_tokens=4, repetitions=1))


def test_cli_one_line_errors(models, tmp_path):
    assert_one_line_error(cli("bench", "--model", tmp_path / "missing"), "missing", "no such file")
    assert_one_line_error(cli("bench", "--model", models["onnx"], "--prompt-tokens", "200"),
                          str(models["onnx"]), "context of 128 tokens")
