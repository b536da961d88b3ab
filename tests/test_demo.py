"""`spj-edge demo --quick`: the README's main job, end to end, and the report a person reads."""
import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, assert_one_line_error, run_cli
from spj_edge.demo import COLUMNS, HELDOUT, PROMPTS
from spj_edge.runtime import Generator

pytestmark = pytest.mark.slow

STAGES = ["teacher", "student", "pruned", "pruned-recovered", "onnx-fp32", "int8", "package"]


def test_quick_demo_runs_every_stage_and_reports_each(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--data", SHARED_DATA, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())

    assert list(report["table"]) == STAGES
    for name, row in report["table"].items():
        assert all(row[held] > 0 for held in HELDOUT), name  # bits per byte on every held-out set
        assert row["decode_tokens_per_s"] > 0 and 0 < row["roofline_share"] < 1.5, name
        assert row["file_mb"] > 0 and row["parameters"] > 0, name
    for name, stage in report["stages"].items():
        assert Path(stage["path"]).exists() and Path(stage["path"]).is_relative_to(out), name
    table = report["table"]
    assert table["pruned"]["parameters"] < table["student"]["parameters"]  # pruning removed something
    assert table["int8"]["file_mb"] < 0.5 * table["onnx-fp32"]["file_mb"]
    assert table["onnx-fp32"]["agreement"] >= 0.99  # the export is the checkpoint
    assert table["int8"]["agreement"] >= 0.95 and table["package"]["agreement"] >= 0.99
    assert table["int8"]["meteor"] is not None  # WordNet comes from --data's nltk_data

    markdown = (out / "REPORT.md").read_text()
    for name in STAGES:
        assert f"| {name} |" in markdown
    assert "| " + " | ".join(COLUMNS) + " |" in markdown and "![" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in STAGES:
        assert json.loads((out / "eval" / f"{name}.json").read_text())["stage"] == "eval"
    assert set(report["samples"]) == set(PROMPTS)
    assert all(text.startswith(PROMPTS[lang]) and len(text) > len(PROMPTS[lang])
               for lang, text in report["samples"].items())
    assert Generator.load(out / "dist" / "model.spj").manifest["quantization"]["mode"] == "static"


def test_demo_without_data_says_how_to_get_some(tmp_path):
    result = run_cli("demo", "--quick", "--data", tmp_path / "nothing", "--out", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "nothing"), "no demo data", "corpus/tinyshakespeare", "--data DIR")
    assert not (tmp_path / "out").exists()
