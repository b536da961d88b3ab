"""--overwrite never destroys what spj-edge did not write, nor an input (issue 20, items 2 and 3); Ctrl-C during
training keeps a checkpoint that --resume continues; the progress bar's estimate ignores the compile warm-up
(issue 12, item 3; issue 20, item 7).

Every refusal here comes before any work, so the inputs are stand-ins (a folder made as the stages make theirs) and
the cases take well under a second each; only the Ctrl-C case trains, in a real process."""
from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHAKESPEARE, SHARED_DATA
from spj_edge.cli import main as cli_main
from spj_edge.errors import EXIT_USAGE
from spj_edge.options import TrainOptions
from spj_edge.outputs import MARKER, check_output, staged_dir
from spj_edge.train import Progress, remaining_seconds, resume_command, warmup_warning

TEXT = SHAKESPEARE / "val.txt"
UNRELATED = "notes.txt"  # a user's file that no --overwrite may take with it


def an_output(path: Path, **files: str) -> Path:
    """A directory written the way every stage writes its output (so it carries the marker)."""
    with staged_dir(path) as tmp:
        for name, text in {"model.onnx": "float32 export", **files}.items():
            (tmp / name).write_text(text)
    return path


def a_users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / UNRELATED).write_text("keep me")
    return path


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(argv: list, capsys, *fragments: str) -> str:
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# --- an output that is, holds or lies inside an input -----------------------------------------------------------------
def test_quantize_out_equal_to_model_keeps_the_float_export(tmp_path, capsys):
    export = an_output(tmp_path / "onnx")
    before = snapshot(tmp_path)
    refused(["quantize", "--model", export, "--out", export, "--calib", TEXT, "--overwrite"], capsys,
            f"{export}: is also an input")
    assert snapshot(tmp_path) == before


def test_package_out_a_parent_of_the_model_keeps_the_model_and_the_users_files(tmp_path, capsys):
    runs = a_users_folder(tmp_path / "runs")
    an_output(runs / "int8")
    before = snapshot(tmp_path)
    refused(["package", "--model", runs / "int8", "--out", runs, "--overwrite"], capsys,
            f"{runs}: holds the input {runs / 'int8'}")
    assert snapshot(tmp_path) == before


def test_an_output_inside_its_input_is_refused(tmp_path, capsys):
    export = an_output(tmp_path / "onnx")
    refused(["quantize", "--model", export, "--out", export / "int8", "--calib", TEXT], capsys,
            f"{export / 'int8'}: is inside the input {export}")
    assert not (export / "int8").exists()


def test_package_out_dot_is_refused_and_leaves_no_staging(tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    an_output(work / "int8")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    refused(["package", "--model", "int8", "--out", ".", "--overwrite"], capsys, ".: is the working directory")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and sorted(p.name for p in work.iterdir()) == ["int8"]


def test_an_output_holding_the_working_directory_is_refused(tmp_path, capsys, monkeypatch):
    export = an_output(tmp_path / "runs" / "onnx")
    monkeypatch.chdir(export)
    refused(["package", "--model", ".", "--out", tmp_path / "runs", "--overwrite"], capsys,
            f"{tmp_path / 'runs'}: holds the working directory")
    assert (export / "model.onnx").is_file()


# --- --overwrite replaces only what spj-edge wrote --------------------------------------------------------------------
def verb_argv(verb: str, w: Path, out: Path) -> list:
    """`spj-edge VERB` with every input it needs (stand-ins: the check comes before any is read) and --out `out`."""
    checkpoint, export = w / "ckpt", w / "onnx"
    return {
        "train": ["train", "--preset", "nano", "--data", TEXT, "--out", out],
        "distill": ["distill", "--teacher", checkpoint, "--preset", "nano", "--data", TEXT, "--out", out],
        "prune": ["prune", "--model", checkpoint, "--ffn-ratio", "0.5", "--importance", "l1", "--out", out],
        "export": ["export", "--model", checkpoint, "--out", out],
        "quantize": ["quantize", "--model", export, "--calib", TEXT, "--out", out],
        "package": ["package", "--model", export, "--out", out],
        "demo": ["demo", "--data", SHARED_DATA, "--quick", "--out", out],
    }[verb]


@pytest.fixture
def stand_ins(tmp_path) -> Path:
    an_output(tmp_path / "ckpt", **{"config.json": "{}"})
    an_output(tmp_path / "onnx")
    return tmp_path


@pytest.mark.parametrize("verb", ["train", "distill", "prune", "export", "quantize", "package", "demo"])
def test_overwrite_refuses_a_folder_spj_edge_did_not_write(verb, stand_ins, capsys):
    out = a_users_folder(stand_ins / "mine")
    refused([*verb_argv(verb, stand_ins, out), "--overwrite"], capsys, f"{out}: not an output directory of spj-edge")
    assert snapshot(out) == {UNRELATED: b"keep me"}


def test_overwrite_accepts_an_earlier_output_and_an_empty_folder(tmp_path):
    earlier = an_output(tmp_path / "earlier")
    assert (earlier / MARKER).is_file(), "every staged output carries the marker that --overwrite looks for"
    assert check_output(earlier, [TEXT], overwrite=True) == earlier
    (tmp_path / "empty").mkdir()
    assert check_output(tmp_path / "empty", [TEXT]) == tmp_path / "empty"


def test_package_tar_refuses_to_replace_a_directory(stand_ins, capsys):
    target = a_users_folder(stand_ins / "dist.spj.tar.gz")
    refused(["package", "--model", stand_ins / "onnx", "--tar", "--out", stand_ins / "dist.spj", "--overwrite"],
            capsys, f"{target}: is a directory")
    assert snapshot(target) == {UNRELATED: b"keep me"}


def test_tokenizer_overwrite_refuses_a_file_it_could_not_have_written(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("keep me")
    refused(["tokenizer", "--data", TEXT, "--out", mine, "--overwrite"], capsys, f"{mine}: not a .json file")
    assert mine.read_text() == "keep me"


# --- the tokenizer's report is an output too (issue 20, item 3) -------------------------------------------------------
def test_tokenizer_refuses_to_replace_its_report_without_overwrite(tmp_path, capsys):
    out, report = tmp_path / "tok.json", tmp_path / "tok.report.json"
    report.write_text('{"stage": "tokenizer", "note": "an earlier run"}')
    refused(["tokenizer", "--data", TEXT, "--vocab-size", "300", "--out", out], capsys,
            f"{report}: already exists (pass --overwrite")
    assert not out.exists() and "an earlier run" in report.read_text()

    assert cli_main(["tokenizer", "--data", str(TEXT), "--vocab-size", "300", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(report.read_text())["vocab_size"] == 300 and out.is_file()


# --- progress: "compiling…" and an estimate from the steps after it (issue 12) ------------------------------------
def test_remaining_seconds_is_the_pace_of_the_timed_steps():
    assert remaining_seconds(0, 0.0, 100) is None
    assert remaining_seconds(4, 2.0, 100) == pytest.approx(50.0)


def test_the_first_step_says_compiling_and_stays_out_of_the_estimate():
    now, stream = [0.0], io.StringIO()
    progress = Progress("train", 600, 0, 1000, compiling=True, enabled=True, clock=lambda: now[0], file=stream)
    assert "train (compiling…)" in stream.getvalue()
    now[0] = 53.0  # torch.compile's warm-up: the first step took 53 s
    progress.advance()
    assert progress.eta() is None, "one step timed with its compilation would put hours on the estimate"
    for _ in range(10):  # then 0.5 s a step
        now[0] += 0.5
        progress.advance()
    assert progress.eta() == pytest.approx((600 - 11) * 0.5)
    progress.bar.refresh()
    assert stream.getvalue().rsplit("\r", 1)[-1].startswith("train: ") and "eta=04:54" in stream.getvalue()
    progress.close()


def test_without_compile_the_bar_does_not_say_compiling():
    stream = io.StringIO()
    Progress("distill", 10, 0, 1, compiling=False, enabled=True, file=stream).close()
    assert "compiling" not in stream.getvalue() and "distill" in stream.getvalue()


# --- warmup (issue 20, item 7) ----------------------------------------------------------------------------------------
def test_a_default_warmup_of_billions_of_steps_is_named_in_one_line():
    warning = warmup_warning(TrainOptions(steps=10**12))
    assert warning is not None and "\n" not in warning
    assert "50,000,000,000 steps" in warning and "--warmup-steps" in warning
    assert warmup_warning(TrainOptions(steps=1000)) is None
    assert warmup_warning(TrainOptions(steps=10**12, warmup_steps=10**11)) is None, "a warmup the user chose"


# --- Ctrl-C (issue 12, issue 20 item 7) ----------------------------------------------------------------------------
def test_the_resume_command_is_the_command_line_plus_resume(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(REPO / "spj_edge" / "cli.py"), "train", "--out", "my runs/t"])
    assert resume_command("train") == shlex.join([sys.executable, "-m", "spj_edge.cli", "train", "--out",
                                                  "my runs/t", "--resume"])
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/spj-edge", "distill", "--resume"])
    assert resume_command("distill") == "/opt/venv/bin/spj-edge distill --resume"
    monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/spj-edge", "demo", "--quick"])
    assert resume_command("train") is None, "the demo trains through the library: it has no --resume"


STEPS = 30


@pytest.mark.slow
def test_ctrl_c_keeps_a_checkpoint_and_its_resume_command_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "spj_edge.cli", "train", "--preset", "nano", "--data", str(TEXT), "--steps",
            str(STEPS), "--batch-size", "8", "--eval-every", "2", "--precision", "fp32", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell without job control starts background commands with SIGINT ignored, and the child would inherit that
    # (a test run started with `&` then never saw the signal): the child gets the default, as a terminal's job has.
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in proc.stderr:  # held-out evaluations are written as lines, the bar isn't
        lines.append(line)
        if line.startswith("step 2:"):
            proc.send_signal(signal.SIGINT)
            break
    lines += proc.stderr.readlines()
    assert proc.wait(timeout=120) == 130, "".join(lines)
    last = lines[-1]
    assert f"saved a checkpoint with its train state in {out}" in last, "".join(lines)
    saved = json.loads((out / "train_state" / "state.json").read_text())["step"]
    assert 2 <= saved < STEPS and f"interrupted at step {saved} of {STEPS}" in last

    command = last.split("continue it with: ", 1)[1].strip()
    assert shlex.split(command) == [*argv, "--resume"]
    resumed = subprocess.run(shlex.split(command), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == STEPS and [h["step"] for h in report["history"]] == list(range(2, STEPS + 1, 2))
