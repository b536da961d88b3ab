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
    from spj_edge.model import load_preset
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


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`spj-edge ARGS` in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "spj_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
