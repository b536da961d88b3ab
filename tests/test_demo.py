"""`spj-edge demo --quick`: the README's main job, end to end, and the report a person reads."""
import json
import re
from pathlib import Path

import pytest

from conftest import SHARED_DATA, assert_one_line_error, cli, run_cli
from smollm2 import GGUF
from spj_edge.demo import COLUMNS, HELDOUT, PRETRAINED_STEPS, PROMPTS, find_pretrained, pretrained_section
from spj_edge.runtime import Generator

STAGES = ["teacher", "student", "pruned", "pruned-recovered", "onnx-fp32", "int8", "package"]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_each(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--data", SHARED_DATA, "--out", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    announced = re.findall(r"^demo: stage (\d+) of (\d+): (.+)$", result.stderr, flags=re.M)
    assert [int(k) for k, _, _ in announced] == list(range(1, len(announced) + 1)), announced
    assert {n for _, n, _ in announced} == {str(len(announced))} and len(announced) == len(report["seconds"])
    assert [name for _, _, name in announced] == list(report["seconds"]), "each announced as it starts"

    assert list(report["table"]) == STAGES
    for name, row in report["table"].items():
        assert all(row[held] > 0 for held in HELDOUT), name  # bits per byte on every held-out set
        assert row["decode_tokens_per_s"] > 0, name
        assert row["roofline_share"] is None or 0 < row["roofline_share"] <= 1, name  # None: flagged as untrustworthy
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
    heldout = report["files"]["heldout"]
    assert set(heldout) == set(HELDOUT) and all(p.endswith(("_test.txt", "tinyshakespeare/val.txt"))
                                                for p in heldout.values())
    assert not set(heldout.values()) & set(report["files"]["train"] + report["files"]["calibration"])
    assert all(f"`{path}`" in markdown for path in heldout.values()), "the report names each figure's file"
    assert "_dev.txt" not in markdown.split("## Reproduce")[1], "reproduce evaluates on held-out files only"
    assert set(report["samples"]) == set(PROMPTS)
    assert all(text.startswith(PROMPTS[lang]) and len(text) > len(PROMPTS[lang])
               for lang, text in report["samples"].items())
    assert Generator.load(out / "dist" / "model.spj").manifest["quantization"]["mode"] == "static"
    assert "--quick" in report["pretrained"]["skipped"] and not any("smollm2" in name for name in report["seconds"])
    assert f"Not run: {report['pretrained']['skipped']}." in markdown


def test_demo_refuses_to_replace_another_mode_or_a_foreign_directory(tmp_path):
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "report.json").write_text(json.dumps({"stage": "demo", "quick": True}))
    assert_one_line_error(cli("demo", "--data", SHARED_DATA, "--out", finished),
                          str(finished), "holds a finished --quick demo", "--overwrite")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert_one_line_error(cli("demo", "--quick", "--data", SHARED_DATA, "--out", foreign),
                          str(foreign), "not a demo's output")
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in finished.iterdir()) == ["report.json"]


def test_demo_without_data_says_how_to_get_some(tmp_path):
    result = cli("demo", "--quick", "--data", tmp_path / "nothing", "--out", tmp_path / "out")
    assert_one_line_error(result, str(tmp_path / "nothing"), "no demo data", "corpus/tinyshakespeare", "--data DIR")
    assert not (tmp_path / "out").exists()


def test_the_full_demo_finds_the_pretrained_model_beside_the_data_or_says_why_not(tmp_path):
    assert find_pretrained(False, SHARED_DATA.parent / "models") == (GGUF, None)
    missing, why = find_pretrained(False, tmp_path)
    assert missing is None and str(tmp_path / GGUF.name) in why and "not found" in why
    quick, why = find_pretrained(True, GGUF.parent)
    assert quick is None and "--quick" in why


def test_the_report_shows_the_pretrained_figures_or_one_line_why_not():
    assert pretrained_section({"skipped": "--quick leaves it out"})[1:] == ["Not run: --quick leaves it out."]
    kept = {"/lm_head/MatMul": "the LM head stays float"}
    ran = {"gguf": str(GGUF), "folder": "runs/demo/smollm2", "seconds": dict.fromkeys(PRETRAINED_STEPS, 12.0),
           "file_bytes": {"float32": 654e6, "static": 256e6},
           "gate": {"bits_per_byte_float": 1.0, "bits_per_byte": 1.0023, "bits_per_byte_increase": 0.0023,
                    "top1_agreement_confident": 0.9992, "confident_share": 0.6, "top1_agreement": 0.98, "kl": 0.01,
                    "passed": True},
           "matmuls": 121, "kept_in_float": kept, "eight_bit": {"/layers.0/mlp/down_proj/MatMul": "its error"},
           "eight_bit_block_size": 32,
           "decode_tokens_per_s": {"float32": 31.0, "static": 47.0},
           "decode_threads": 2, "prompt": "Name the capital of France.", "reply": "Paris."}
    markdown = "\n\n".join(pretrained_section(ran))
    for fragment in ("| file MB | 654 | 256 (39%) |", "1.0023 (+0.23%)", "| decode tok/s (2 threads) | 31 | 47 |",
                     "99.92%", "1 of 121 weight MatMuls have 8-bit block weights",
                     "all of them (the faster kernel there), in blocks of 32:",
                     "- `/layers.0/mlp/down_proj/MatMul`: its error", "1 stayed float:",
                     "- `/lm_head/MatMul`: the LM head stays float",
                     "```text\nParis.\n```", "| seconds | 12 | 12 | 12 | 12 | 12 |"):
        assert fragment in markdown, fragment
