"""Crash safety: SIGKILL at random moments of train, export, quantize and package leaves the output absent or
complete and valid (never a mix); killed while replacing a complete output (--overwrite), the old output or the new
one is there; `train --resume` after any number of kills reaches the uninterrupted run's weights bit for bit; and the
next run removes what killed runs left beside the output.

Each trial starts `python -m spj_edge.cli ...` and SIGKILLs it after a random delay within 1.1 × the command's duration,
measured once by an uninterrupted reference run, so kills land anywhere from the interpreter's start to past the final
rename (a command's n trials draw one delay from each n-th of that span). The delays come from a generator seeded with
SPJ_CRASH_SEED (default 8); a failure message names the seed, the trial and the delay, which is all it takes to rerun
the same kills."""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import onnxruntime as ort
import pytest
from safetensors import safe_open

from conftest import REPO, SHAKESPEARE, UD, run_cli
from spj_edge.checkpoint import checkpoint_sha256, load_checkpoint
from spj_edge.outputs import _exchange
from spj_edge.runtime import Generator

pytestmark = pytest.mark.slow  # SIGKILL trials: real processes killed at random moments

SEED = int(os.environ.get("SPJ_CRASH_SEED", "8"))
ENV = {"OMP_NUM_THREADS": "1"}  # one thread: every run of the same command computes the same bits
# Enough steps that the loop, with a checkpoint every 4 steps, is about half of a run (the rest: start-up).
STEPS, SAVE_EVERY = 24, 4
TRAIN = ["train", "--preset", "nano", "--data", SHAKESPEARE / "val.txt", "--steps", STEPS, "--batch-size", "8",
         "--precision", "fp32", "--eval-every", "12", "--save-every", SAVE_EVERY, "--seed", "3"]
# --force: a kill, not the accuracy gate (test_quantize's subject), decides whether an output is written here
QUANTIZE = ["quantize", "--calib", UD / "en_ewt_dev.txt", "--calib-samples", "4", "--force"]
EXPORT_FILES = {"model.onnx", "config.json", "tokenizer.json", "report.json"}
OLD = "OLD"  # a marker file put into a complete output before a killed --overwrite: which one survived?
SLACK = 1.1  # delays up to 10 % past the measured duration: a slower run is still killed during its last writes
outcomes: dict[str, list[str]] = {}  # command → what each trial left, printed at the end (pytest -s)


def spj_edge_cmd(args) -> list[str]:
    return [sys.executable, "-m", "spj_edge.cli", *map(str, args)]


@pytest.fixture(scope="module")
def rng():
    return random.Random(SEED)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of each command, each stage reading the one before: the complete outputs to compare
    with, and how long each command takes. (The checkpoint is trained for a few steps only, so the quantizer's
    accuracy gate is waived with --force.)"""
    root = tmp_path_factory.mktemp("reference")
    commands = {
        "train": [*TRAIN, "--out", root / "ckpt"],
        "export": ["export", "--model", root / "ckpt", "--out", root / "onnx"],
        "quantize": [*QUANTIZE, "--model", root / "onnx", "--out", root / "int8"],
        "package": ["package", "--model", root / "int8", "--out", root / "nano.spj"],
        "package --tar": ["package", "--model", root / "int8", "--out", root / "nano.spj", "--tar"],
    }
    durations = {}
    for name, args in commands.items():
        started = time.perf_counter()
        result = run_cli(*args, env=ENV)
        durations[name] = time.perf_counter() - started
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    yield {"durations": durations, "train": root / "ckpt", "export": root / "onnx", "quantize": root / "int8",
           "package": root / "nano.spj", "package --tar": root / "nano.spj.tar.gz"}
    print(f"\ncrash trials (seed {SEED}); durations " + ", ".join(f"{k} {v:.1f} s" for k, v in durations.items()))
    for command, seen in outcomes.items():
        print(f"  {command}: {len(seen)} trials: " + ", ".join(f"{seen.count(o)} {o}" for o in sorted(set(seen))))


def kill_delays(rng: random.Random, n: int, duration: float) -> list[float]:
    """n delays, one drawn uniformly from each of n equal slices of [0, SLACK × duration], in random order: random
    moments that still reach the start-up, the work and the final rename of a run."""
    width = SLACK * duration / n
    delays = [rng.uniform(i * width, (i + 1) * width) for i in range(n)]
    rng.shuffle(delays)
    return delays


def kill_after(args, delay: float, log: Path) -> bool:
    """Run `spj-edge ARGS` and SIGKILL it `delay` s after its start. True if the kill came first; a run that ended
    before it must have succeeded."""
    tmp = log.parent / "TMPDIR"  # where the stages' own temporary files go: see what a kill leaves there
    tmp.mkdir(exist_ok=True)
    with open(log, "w") as stderr:
        proc = subprocess.Popen(spj_edge_cmd(args), cwd=REPO, env={**os.environ, **ENV, "TMPDIR": str(tmp)},
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped: its PID is free, as after any crash
            return True
    assert proc.returncode == 0, log.read_text()[-2000:]
    return False


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


def staging_leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if re.fullmatch(rf"\.{re.escape(out.name)}\.\w+-.*", p.name))


# --- what a complete output is ---------------------------------------------------------------------------------------
def check_checkpoint(out: Path, reference: Path) -> int:
    """A checkpoint that loads, with the train state --resume needs; a final one is the reference's, bit for bit.
    Returns its step."""
    load_checkpoint(out)
    state = json.loads((out / "train_state" / "state.json").read_text())
    with safe_open(str(out / "train_state" / "optimizer.safetensors"), framework="pt") as f:
        assert len(f.keys()) > 0
    step = json.loads((out / "report.json").read_text())["step"]
    assert step == state["step"] and step % SAVE_EVERY == 0 and 0 < step <= STEPS, step
    if step == STEPS:
        assert checkpoint_sha256(out) == checkpoint_sha256(reference)
    return step


def check_onnx_dir(out: Path, reference: Path) -> None:
    """An export or quantize output: all four files, a graph onnxruntime loads, the reference's bytes."""
    assert EXPORT_FILES <= {p.name for p in out.iterdir()}
    for name in ("config.json", "report.json"):
        json.loads((out / name).read_text())
    ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sha256(out / "model.onnx") == sha256(reference / "model.onnx")
    assert sha256(out / "tokenizer.json") == sha256(reference / "tokenizer.json")


def check_package(out: Path, reference: Path) -> None:
    """Generator.load verifies every file against spj.json; the files are the reference's."""
    files = Generator.load(out, threads=1).manifest["files"]
    assert files == Generator.load(reference, threads=1).manifest["files"]


CHECKS = {"export": check_onnx_dir, "quantize": check_onnx_dir, "package": check_package,
          "package --tar": check_package}


def args_for(command: str, reference: dict, out: Path) -> list:
    """The reference run's arguments, writing `out` instead."""
    return {"export": ["export", "--model", reference["train"], "--out", out],
            "quantize": [*QUANTIZE, "--model", reference["export"], "--out", out],
            "package": ["package", "--model", reference["quantize"], "--out", out],
            "package --tar": ["package", "--model", reference["quantize"], "--out", out.parent / "nano.spj", "--tar"],
            }[command]


# --- the trials ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, trials", [("export", 5), ("quantize", 5), ("package", 3), ("package --tar", 3)])
def test_killed_at_a_random_moment_the_output_is_absent_or_complete(command, trials, reference, rng, tmp_path):
    """Even trials start with no output; odd ones replace a complete one (--overwrite), which must survive or be
    replaced whole. Then one uninterrupted run completes and removes what the killed runs left."""
    target = reference[command]
    out = tmp_path / target.name
    args = args_for(command, reference, out)
    check, duration = CHECKS[command], reference["durations"][command]
    seen = outcomes.setdefault(command, [])
    for trial, delay in enumerate(kill_delays(rng, trials, duration)):
        replacing = trial % 2 == 1
        if replacing and target.is_dir():  # a complete output, marked to tell afterwards whether it is the old one
            shutil.copytree(target, out)
            (out / OLD).touch()
        elif replacing:
            shutil.copy(target, out)
        where = f"{command}, seed {SEED}, trial {trial}: killed {delay:.2f} s into a {duration:.2f} s run"
        killed = kill_after([*args, *(["--overwrite"] if replacing else [])], delay, tmp_path / f"{trial}.log")
        if not out.exists():
            assert not replacing, f"{where}: the old output is gone and no new one took its place"
            seen.append("absent")
            continue
        try:
            check(out, target)
        except Exception as e:
            raise AssertionError(f"{where}: {out} is not a complete output ({type(e).__name__}: {e})") from e
        seen.append("finished before the kill" if not killed else
                    "complete output, old or new" if replacing and not out.is_dir() else
                    "old output" if replacing and (out / OLD).exists() else "complete new output")
        remove(out)

    # the same TMPDIR as the killed runs': a runtime killed inside the package stage's check left its private folder
    # there, which the next one to load a package removes
    result = run_cli(*args, env={**ENV, "TMPDIR": str(tmp_path / "TMPDIR")})
    assert result.returncode == 0, result.stderr[-2000:]
    check(out, target)
    assert list((tmp_path / "TMPDIR").iterdir()) == [], "scratch work goes beside the output, never to TMPDIR"
    assert staging_leftovers(out) == [], "the next run removes what killed runs left beside the output"



def test_train_killed_at_random_moments_then_resumed_reaches_the_uninterrupted_weights(reference, rng, tmp_path):
    """Six runs killed at random moments, fresh or resumed (each resumes from whatever checkpoint the last kill left,
    or starts again when none), then one run to the end: the weights are the uninterrupted run's."""
    out = tmp_path / "ckpt"
    duration, seen = reference["durations"]["train"], outcomes.setdefault("train", [])
    for delay in kill_delays(rng, 6, duration):
        resume = (out / "train_state" / "state.json").is_file()
        where = f"train{' --resume' if resume else ''}, seed {SEED}: killed {delay:.2f} s into a {duration:.2f} s run"
        killed = kill_after([*TRAIN, "--out", out, *(["--resume"] if resume else [])], delay, tmp_path / "train.log")
        if out.exists():
            step = check_checkpoint(out, reference["train"])
            seen.append(f"checkpoint at step {step}" if killed else "finished before the kill")
        else:
            assert not resume, f"{where}: the checkpoint being resumed is gone"
            seen.append("absent")
        if not killed:  # finished (and checked to be the reference): start over, so that kills interrupt real work
            shutil.rmtree(out)

    resumed = run_cli(*TRAIN, "--out", out, *(["--resume"] if out.exists() else []), env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert check_checkpoint(out, reference["train"]) == STEPS  # bit-identical to the reference (checked there)
    assert staging_leftovers(out) == [], "the next run removes what killed runs left beside the output"


def test_train_killed_while_overwriting_keeps_a_checkpoint_that_resumes_to_the_same_weights(reference, rng,
                                                                                            tmp_path):
    out = tmp_path / "ckpt"
    duration, seen = reference["durations"]["train"], outcomes.setdefault("train --overwrite", [])
    for trial, delay in enumerate(kill_delays(rng, 2, duration)):
        shutil.copytree(reference["train"], out)
        (out / OLD).touch()
        where = f"train --overwrite, seed {SEED}, trial {trial}: killed {delay:.2f} s into a {duration:.2f} s run"
        killed = kill_after([*TRAIN, "--out", out, "--overwrite"], delay, tmp_path / f"{trial}.log")
        assert out.exists(), f"{where}: the old checkpoint is gone and no new one took its place"
        step = check_checkpoint(out, reference["train"])
        seen.append("old checkpoint" if (out / OLD).exists() else
                    f"new checkpoint at step {step}" if killed else "finished before the kill")
        resumed = run_cli(*TRAIN, "--out", out, "--resume", env=ENV)
        assert resumed.returncode == 0, f"{where}: {resumed.stderr[-2000:]}"
        assert check_checkpoint(out, reference["train"]) == STEPS, where
        shutil.rmtree(out)


# --- the swap itself, killed at each of its steps --------------------------------------------------------------------
DIE_AFTER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import spj_edge.outputs as outputs

    path, point = Path(sys.argv[1]), sys.argv[2]
    if point.startswith("renames"):
        outputs._RENAMEAT2 = None  # as on a system or filesystem without an atomic exchange

    def then_die(function):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call

    if point == "exchange":
        outputs._exchange = then_die(outputs._exchange)
    elif point == "renames: old moved away":
        outputs.os.replace = then_die(os.replace)
    with outputs.staged_dir(path) as tmp:
        (tmp / "result").write_text("new")
        if point == "filling":
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("point", ["filling", "exchange", "renames: old moved away"])
def test_killed_at_any_step_of_the_swap_the_path_keeps_a_complete_result(tmp_path, point):
    """staged_dir's swap, killed right after each of its steps: `path` holds the old or the new result (or, between
    two renames, the old one comes back with the next staged_dir), and the leftovers go."""
    path = tmp_path / "out"
    path.mkdir()
    (path / "result").write_text("old")
    probe_a, probe_b = tmp_path / ".probe-a", tmp_path / ".probe-b"
    probe_a.mkdir(), probe_b.mkdir()
    if point == "exchange" and not _exchange(probe_a, probe_b):
        pytest.skip("no atomic exchange of names on this system or filesystem")
    died = subprocess.run([sys.executable, "-c", DIE_AFTER, str(path), point], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert died.returncode == -signal.SIGKILL, died.stderr
    left = staging_leftovers(path)
    assert [name.split("-")[0] for name in left] == [".out.old", ".out.partial"][point != "renames: old moved away":]
    if point == "renames: old moved away":
        assert not path.exists() and (tmp_path / left[0] / "out" / "result").read_text() == "old"
    else:
        assert (path / "result").read_text() == ("new" if point == "exchange" else "old")

    from spj_edge.outputs import remove_stale_staging

    remove_stale_staging(path)
    assert staging_leftovers(path) == []
    assert (path / "result").read_text() == ("new" if point == "exchange" else "old")


def test_a_live_process_staging_is_left_alone(tmp_path):
    """Two runs writing the same output: one finishing must not delete the other's staging directory."""
    from spj_edge.outputs import staged_dir

    path = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        theirs = tmp_path / f".out.partial-{live.pid}-abcdefgh"
        dead = tmp_path / ".out.partial-999999999-abcdefgh"  # above any pid_max: no such process
        theirs.mkdir(), dead.mkdir()
        with staged_dir(path) as tmp:
            (tmp / "result").write_text("new")
        assert theirs.is_dir() and not dead.exists() and (path / "result").read_text() == "new"
    finally:
        live.kill()
        live.wait()
