"""Shared fixtures: the real text of ../shared/data and a nano checkpoint trained once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPJ_SHARED_DATA", REPO.parent / "shared" / "data"))
UD = SHARED_DATA / "corpus" / "ud"
SHAKESPEARE = SHARED_DATA / "corpus" / "tinyshakespeare"
LANGUAGES = {"en": "en_ewt", "fr": "fr_gsd", "de": "de_gsd", "es": "es_gsd", "zh": "zh_gsdsimp"}


def pytest_configure(config):
    if not UD.is_dir():
        raise pytest.UsageError(f"{SHARED_DATA}: the shared data the tests read is missing (set SPJ_SHARED_DATA)")


@pytest.fixture(scope="session")
def small_corpus() -> list[Path]:
    """About 300 KB of real text in five languages: enough for nano to learn something in seconds."""
    return [SHAKESPEARE / "val.txt", *(UD / f"{name}_dev.txt" for name in LANGUAGES.values())]


@pytest.fixture(scope="session")
def nano_checkpoint(tmp_path_factory, small_corpus) -> Path:
    from spj_edge.config import load_preset
    from spj_edge.train import TrainOptions, train

    out = tmp_path_factory.mktemp("ckpt") / "nano"
    train(load_preset("nano"), small_corpus, out, TrainOptions(steps=60, batch_size=16, lr=1e-2, eval_every=30))
    return out


@pytest.fixture(scope="session")
def nano_package(nano_checkpoint, tmp_path_factory) -> Path:
    """nano_checkpoint exported (fused graph) and packaged as a directory, for tests that need a loaded runtime."""
    from spj_edge.export import export
    from spj_edge.package import package

    dist = tmp_path_factory.mktemp("nano-package")
    export(nano_checkpoint, dist / "onnx")
    package(dist / "onnx", dist / "nano.spj")
    return dist / "nano.spj"


def logit_bound(reference) -> float:
    """How far two float32 computations of the same logits may differ when only summation order and kernels differ
    (PyTorch vs onnxruntime vs transformers, AVX-512 vs AVX2 vs NEON, one row vs a batch).

    A reordered float32 sum of n terms moves by at most n·u·Σ|terms| (u = 2**-24, Higham's bound, whatever the order).
    The longest chain here, a logit through a test model's layers, is under 2**11 summed terms, so the order may cost
    up to 2**-13 of the terms' magnitude, which for a logit is of the order of the largest logit. That is a worst case
    over orders, so it holds on any CPU, and it stays far below what a real defect (a wrong mask, position or head)
    moves a logit by: tenths or more.
    """
    import numpy as np

    return 2.0 ** -13 * max(1.0, float(np.abs(np.asarray(reference)).max()))


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`spj-edge ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "spj_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
