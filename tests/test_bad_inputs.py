"""Bad input, verb by verb: every case ends with one line on stderr naming the file or flag and the problem, the
documented exit code (2: bad input, 1: an I/O failure such as a full disk), no traceback, and nothing written.

The table runs in-process through the two `main` functions (no interpreter start per case); a few cases run as real
processes to prove the exit code a shell sees. Every case fails before any training, so the checkpoint is the session's
untrained nano (conftest.untrained): its weights don't matter, and it takes a second instead of the minute
`nano_checkpoint` trains for.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import pytest

from conftest import REPO, SHAKESPEARE, run_cli
from spj_edge.cli import main as cli_main
from spj_edge.errors import EXIT_USAGE
from spj_edge.runtime.__main__ import main as runtime_main

EXIT_IO = 1  # errors.run_command: an OSError (a full disk) ends with exit code 1


def foreign_onnx() -> bytes:
    """A valid ONNX model with an I/O contract of its own: one Relu."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    return onnx.helper.make_model(graph).SerializeToString()


def variant(source: Path, target: Path, **files: bytes | None) -> Path:
    """A copy of the directory `source` with some files replaced (None: made a directory instead)."""
    shutil.copytree(source, target)
    for name, data in files.items():
        path = target / name.replace("__", ".")
        path.unlink()
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
    return target


def rehash(package_dir: Path, **manifest_changes) -> Path:
    """Make spj.json vouch for the package's files as they are now, so that only the change under test is wrong."""
    manifest = json.loads((package_dir / "spj.json").read_text())
    for name in ("model.onnx", "model.onnx.data", "tokenizer.json"):
        if not (package_dir / name).is_file():
            continue
        data = (package_dir / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    for path, value in manifest_changes.items():
        *parents, key = path.split("__")
        node = manifest
        for parent in parents:
            node = node[parent]
        node[key] = value
    (package_dir / "spj.json").write_text(json.dumps(manifest))
    return package_dir


class World:
    """Every input the cases name, good and bad, built once per module."""

    def __init__(self, root: Path, untrained: Path):
        self.root = root
        self.missing = root / "missing.txt"
        self.empty = root / "empty.txt"  # zero bytes
        self.latin1 = root / "latin1.txt"
        self.binary = root / "binary.bin"
        self.few_words = root / "few-words.txt"
        self.empty_dir = root / "empty-dir"
        self.text = SHAKESPEARE / "val.txt"
        self.empty.write_bytes(b"")
        self.latin1.write_bytes("Caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e.\n".encode("latin-1"))
        self.binary.write_bytes(bytes(range(256)) * 8)
        self.few_words.write_text("Only a few words here.\n")
        self.empty_dir.mkdir()
        self.bad_preset = root / "preset.json"
        self.bad_preset.write_text('{"vocab_size": 512, "hidden_size": ')  # cut off mid-object

        ck = self.checkpoint = root / "ckpt"  # copies of the session's, so that snapshot() covers them too
        shutil.copytree(untrained / "ckpt", ck)
        weights = (ck / "model.safetensors").read_bytes()
        tokenizer = (ck / "tokenizer.json").read_bytes()
        self.ck_truncated = variant(ck, root / "ck-truncated", model__safetensors=weights[: len(weights) // 2])
        self.ck_zero = variant(ck, root / "ck-zero", model__safetensors=b"")
        self.ck_garbage = variant(ck, root / "ck-garbage", model__safetensors=os.urandom(4096))
        self.ck_weights_dir = variant(ck, root / "ck-weights-dir", model__safetensors=None)
        self.ck_config_binary = variant(ck, root / "ck-config-binary", config__json=bytes(range(256)))
        self.ck_config_empty = variant(ck, root / "ck-config-empty", config__json=b"")
        self.ck_tokenizer_truncated = variant(ck, root / "ck-tok-truncated",
                                              tokenizer__json=tokenizer[: len(tokenizer) // 2])
        # a tokenizer of another model: 1,024 tokens for a model with 512 embeddings
        big = json.loads(tokenizer)
        vocab = big["model"]["vocab"]
        vocab.update({f"extra{i}": len(vocab) + i for i in range(512)})
        self.big_tokenizer = json.dumps(big).encode()
        self.ck_big_tokenizer = variant(ck, root / "ck-big-tok", tokenizer__json=self.big_tokenizer)
        self.ck_damaged_state = variant(ck, root / "ck-damaged-state")
        (self.ck_damaged_state / "train_state").mkdir()
        (self.ck_damaged_state / "train_state" / "state.json").write_text('{"step": 3}')
        self.big_tokenizer_file = root / "big-tokenizer.json"
        self.big_tokenizer_file.write_bytes(self.big_tokenizer)

        ex = self.export = root / "onnx"
        shutil.copytree(untrained / "onnx", ex)
        onnx_bytes = (ex / "model.onnx").read_bytes()
        self.ex_truncated = variant(ex, root / "ex-truncated", model__onnx=onnx_bytes[: len(onnx_bytes) // 3])
        self.ex_zero = variant(ex, root / "ex-zero", model__onnx=b"")
        self.ex_foreign = variant(ex, root / "ex-foreign", model__onnx=foreign_onnx())
        self.ex_big_tokenizer = variant(ex, root / "ex-big-tok", tokenizer__json=self.big_tokenizer)
        self.ex_tokenizer_binary = variant(ex, root / "ex-tok-binary", tokenizer__json=bytes(range(256)))

        pkg = self.package = root / "nano.spj"
        shutil.copytree(untrained / "nano.spj", pkg)
        self.pkg_future = rehash(variant(pkg, root / "future.spj"), format_version=3)
        self.pkg_foreign = rehash(variant(pkg, root / "foreign.spj", model__onnx=foreign_onnx()))
        self.pkg_bad_tokenizer = rehash(variant(pkg, root / "bad-tok.spj", tokenizer__json=b'{"model": 1'))
        self.pkg_big_tokenizer = rehash(variant(pkg, root / "big-tok.spj", tokenizer__json=self.big_tokenizer))
        self.pkg_model_dir = variant(pkg, root / "model-dir.spj", model__onnx=None)
        self.pkg_manifest_binary = variant(pkg, root / "manifest-binary.spj", spj__json=bytes(range(256)))
        self.pkg_vocab_text = rehash(variant(pkg, root / "vocab-text.spj"), model__vocab_size="512")
        self.pkg_hot_default = rehash(variant(pkg, root / "hot.spj"), generation__temperature=-1)
        self.tar_zero = root / "zero.spj.tar.gz"
        self.tar_zero.write_bytes(b"")

    def snapshot(self) -> dict[str, int]:
        return {str(p.relative_to(self.root)): p.stat().st_size for p in sorted(self.root.rglob("*"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory, untrained) -> World:
    return World(tmp_path_factory.mktemp("bad-inputs"), untrained)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[World, Path], list]  # (inputs, --out) → the arguments
    fragments: tuple[str, ...]  # each must be in the message; {w.NAME} and {out} are filled in
    code: int = EXIT_USAGE
    runtime: bool = False  # `python -m spj_edge.runtime` rather than `spj-edge`
    marks: tuple = ()


def case(id, argv, *fragments, **options) -> Case:
    return Case(id, argv, fragments, **options)


def runtime_case(id, model, flags, fragments, marks=()) -> Case:
    """`python -m spj_edge.runtime --model MODEL --prompt Hi FLAGS`."""
    return Case(f"runtime-{id}", lambda w, out: ["--model", model(w), "--prompt", "Hi", *flags], tuple(fragments),
                runtime=True, marks=marks)


def seeded_generate(w, out):
    return ["generate", "--model", w.checkpoint, "--prompt", "Hi", "--seed", "-1", "--max-new-tokens", "2"]


LONG_PROMPT = "word " * 200  # 200+ tokens; nano's context is 128
TEXT = "{w.text}"

CASES = [
    # --- tokenizer ----------------------------------------------------------------------------------------------------
    case("tokenizer-missing-data", lambda w, out: ["tokenizer", "--data", w.missing, "--out", out],
         "{w.missing}: no such file or directory"),
    case("tokenizer-zero-byte-data", lambda w, out: ["tokenizer", "--data", w.empty, "--out", out],
         "{w.empty}: no text found"),
    case("tokenizer-binary-data", lambda w, out: ["tokenizer", "--data", w.binary, "--out", out],
         "{w.binary}: binary file"),
    case("tokenizer-latin1-data", lambda w, out: ["tokenizer", "--data", w.latin1, "--out", out],
         "{w.latin1}: not UTF-8 text"),
    case("tokenizer-empty-directory", lambda w, out: ["tokenizer", "--data", w.empty_dir, "--out", out],
         "{w.empty_dir}: directory has no files"),
    case("tokenizer-vocab-too-small", lambda w, out: ["tokenizer", "--data", w.text, "--vocab-size", "-5",
                                                      "--out", out], "--vocab-size must be at least 259", "got -5"),
    case("tokenizer-out-is-a-directory", lambda w, out: ["tokenizer", "--data", w.text, "--out", w.empty_dir],
         "{w.empty_dir}: is a directory"),
    case("tokenizer-out-below-a-file", lambda w, out: ["tokenizer", "--data", w.text, "--out", w.few_words / "t.json"],
         "{w.few_words}: is a file, expected a directory"),
    # --- train --------------------------------------------------------------------------------------------------------
    case("train-negative-steps", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--steps", "-1",
                                                 "--out", out], "--steps must be a positive integer, got -1"),
    case("train-val-fraction-1", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--val-fraction", "1",
                                                 "--out", out], "--val-fraction must be in (0, 1), got 1.0"),
    case("train-negative-warmup", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--warmup-steps",
                                                  "-5", "--out", out], "--warmup-steps", "got -5"),
    case("train-negative-grad-clip", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--grad-clip",
                                                     "-1", "--out", out], "--grad-clip", "got -1.0"),
    case("train-nan-weight-decay", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--weight-decay",
                                                   "nan", "--out", out], "--weight-decay", "got nan"),
    case("train-negative-seed", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--seed", "-1",
                                                "--out", out], "--seed", "got -1"),
    case("train-unknown-preset", lambda w, out: ["train", "--preset", "gigantic", "--data", w.text, "--out", out],
         "gigantic: no such preset"),
    case("train-truncated-preset", lambda w, out: ["train", "--preset", w.bad_preset, "--data", w.text, "--out", out],
         "{w.bad_preset}: not valid JSON"),
    case("train-tokenizer-is-a-directory", lambda w, out: ["train", "--preset", "nano", "--data", w.text,
                                                           "--tokenizer", w.empty_dir, "--out", out],
         "{w.empty_dir}: is a directory, expected tokenizer.json"),
    case("train-tokenizer-zero-byte", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--tokenizer",
                                                      w.empty, "--out", out], "{w.empty}: not a valid tokenizer.json"),
    case("train-tokenizer-of-another-model", lambda w, out: ["train", "--preset", "nano", "--data", w.text,
                                                             "--tokenizer", w.big_tokenizer_file, "--out", out],
         "{w.big_tokenizer_file}: the tokenizer has 1024 tokens but the model's vocabulary has 512"),
    case("train-resume-nothing", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--resume",
                                                 "--out", out], "{out}: nothing to resume"),
    case("train-resume-damaged-state", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--resume",
                                                       "--out", w.ck_damaged_state],
         "{w.ck_damaged_state}/train_state/state.json: incomplete train state, it lacks options"),
    case("train-latin1-val-data", lambda w, out: ["train", "--preset", "nano", "--data", w.text, "--tokenizer",
                                                  w.checkpoint / "tokenizer.json", "--val-data", w.latin1,
                                                  "--out", out], "{w.latin1}: not UTF-8 text"),
    case("train-too-little-text", lambda w, out: ["train", "--preset", "nano", "--data", w.few_words, "--tokenizer",
                                                  w.checkpoint / "tokenizer.json", "--out", out],
         "{w.few_words}: too little text"),
    # --- distill ------------------------------------------------------------------------------------------------------
    case("distill-missing-teacher", lambda w, out: ["distill", "--teacher", w.missing, "--preset", "nano", "--data",
                                                    w.text, "--out", out], "{w.missing}: no such checkpoint directory"),
    case("distill-teacher-is-a-file", lambda w, out: ["distill", "--teacher", w.text, "--preset", "nano", "--data",
                                                      w.text, "--out", out],
         TEXT + ": expected a checkpoint directory", "found a file"),
    case("distill-alpha-2", lambda w, out: ["distill", "--teacher", w.checkpoint, "--preset", "nano", "--alpha", "2",
                                            "--data", w.text, "--out", out], "--alpha must be in [0, 1]", "got 2.0"),
    case("distill-negative-temperature", lambda w, out: ["distill", "--teacher", w.checkpoint, "--preset", "nano",
                                                         "--temperature", "-1", "--data", w.text, "--out", out],
         "--temperature must be a positive number, got -1.0"),
    case("distill-truncated-teacher", lambda w, out: ["distill", "--teacher", w.ck_truncated, "--preset", "nano",
                                                      "--data", w.text, "--out", out],
         "{w.ck_truncated}/model.safetensors: corrupt or truncated safetensors file"),
    case("distill-student-of-another-tokenizer", lambda w, out: ["distill", "--teacher", w.checkpoint, "--student",
                                                                 w.ck_big_tokenizer, "--data", w.text, "--out", out],
         "{w.ck_big_tokenizer}/tokenizer.json: the tokenizer has 1024 tokens", "do not belong together"),
    # --- prune --------------------------------------------------------------------------------------------------------
    case("prune-ratio-1", lambda w, out: ["prune", "--model", w.checkpoint, "--ffn-ratio", "1", "--importance", "l1",
                                          "--out", out], "--ffn-ratio must be in [0, 1)", "got 1.0"),
    case("prune-negative-head-ratio", lambda w, out: ["prune", "--model", w.checkpoint, "--ffn-ratio", "0.5",
                                                      "--head-ratio", "-0.5", "--importance", "l1", "--out", out],
         "--head-ratio must be in [0, 1)", "got -0.5"),
    case("prune-multiple-0", lambda w, out: ["prune", "--model", w.checkpoint, "--ffn-ratio", "0.5", "--multiple", "0",
                                             "--importance", "l1", "--out", out], "--multiple must be a positive"),
    case("prune-binary-calib", lambda w, out: ["prune", "--model", w.checkpoint, "--ffn-ratio", "0.5", "--calib",
                                               w.binary, "--out", out], "{w.binary}: binary file"),
    case("prune-calib-too-small", lambda w, out: ["prune", "--model", w.checkpoint, "--ffn-ratio", "0.5", "--calib",
                                                  w.few_words, "--out", out], "{w.few_words}: too little text"),
    case("prune-zero-byte-weights", lambda w, out: ["prune", "--model", w.ck_zero, "--ffn-ratio", "0.5",
                                                    "--importance", "l1", "--out", out],
         "{w.ck_zero}/model.safetensors: corrupt or truncated safetensors file"),
    case("prune-binary-config", lambda w, out: ["prune", "--model", w.ck_config_binary, "--ffn-ratio", "0.5",
                                                "--importance", "l1", "--out", out],
         "{w.ck_config_binary}/config.json: not valid JSON"),
    case("prune-weights-are-a-directory", lambda w, out: ["prune", "--model", w.ck_weights_dir, "--ffn-ratio", "0.5",
                                                          "--importance", "l1", "--out", out],
         "{w.ck_weights_dir}/model.safetensors: is a directory"),
    # --- generate -----------------------------------------------------------------------------------------------------
    case("generate-prompt-longer-than-context",
         lambda w, out: ["generate", "--model", w.checkpoint, "--prompt", LONG_PROMPT],
         "prompt is", "the model's context is 128"),
    case("generate-top-p-2", lambda w, out: ["generate", "--model", w.checkpoint, "--prompt", "Hi", "--top-p", "2"],
         "top_p must be in (0, 1], got 2.0"),
    case("generate-temperature-minus-1", lambda w, out: ["generate", "--model", w.checkpoint, "--prompt", "Hi",
                                                         "--temperature", "-1"], "temperature must be ≥ 0, got -1.0"),
    case("generate-negative-max-new-tokens", lambda w, out: ["generate", "--model", w.checkpoint, "--prompt", "Hi",
                                                             "--max-new-tokens", "-1"], "max_new_tokens must be ≥ 0"),
    case("generate-negative-seed", seeded_generate, "seed", "-1"),
    case("generate-empty-config", lambda w, out: ["generate", "--model", w.ck_config_empty, "--prompt", "Hi"],
         "{w.ck_config_empty}/config.json: not valid JSON"),
    case("generate-truncated-tokenizer", lambda w, out: ["generate", "--model", w.ck_tokenizer_truncated, "--prompt",
                                                         "Hi"],
         "{w.ck_tokenizer_truncated}/tokenizer.json: not a valid tokenizer.json"),
    case("generate-tokenizer-of-another-model", lambda w, out: ["generate", "--model", w.ck_big_tokenizer, "--prompt",
                                                                "Hi"], "{w.ck_big_tokenizer}/tokenizer.json",
         "do not belong together"),
    # --- export -------------------------------------------------------------------------------------------------------
    case("export-opset-5", lambda w, out: ["export", "--model", w.checkpoint, "--opset", "5", "--out", out],
         "--opset 5 is out of range"),
    case("export-missing-model", lambda w, out: ["export", "--model", w.missing, "--out", out],
         "{w.missing}: no such checkpoint directory"),
    case("export-garbage-weights", lambda w, out: ["export", "--model", w.ck_garbage, "--out", out],
         "{w.ck_garbage}/model.safetensors: corrupt or truncated safetensors file"),
    case("export-out-is-a-file", lambda w, out: ["export", "--model", w.checkpoint, "--out", w.few_words],
         "{w.few_words}: already exists"),
    case("export-out-below-a-file", lambda w, out: ["export", "--model", w.checkpoint, "--out", w.few_words / "onnx"],
         "{w.few_words}: is a file, expected a directory"),
    # --- quantize -----------------------------------------------------------------------------------------------------
    case("quantize-calib-too-small", lambda w, out: ["quantize", "--model", w.export, "--calib", w.few_words, "--eval",
                                                     w.text, "--out", out],
         "{w.few_words}: too little text to calibrate"),
    case("quantize-foreign-onnx", lambda w, out: ["quantize", "--model", w.ex_foreign, "--calib", w.text, "--out", out],
         "{w.ex_foreign}/model.onnx: inputs ['x']", "not the spj-edge ONNX contract"),
    case("quantize-truncated-onnx", lambda w, out: ["quantize", "--model", w.ex_truncated, "--calib", w.text,
                                                    "--out", out],
         "{w.ex_truncated}/model.onnx: not a valid ONNX model"),
    case("quantize-zero-byte-onnx", lambda w, out: ["quantize", "--model", w.ex_zero, "--calib", w.text, "--out", out],
         "{w.ex_zero}/model.onnx: empty file"),
    case("quantize-model-is-a-file", lambda w, out: ["quantize", "--model", w.export / "model.onnx", "--calib", w.text,
                                                     "--out", out],
         "{w.export}/model.onnx: expected an export directory", "found a file"),
    case("quantize-tokenizer-of-another-model", lambda w, out: ["quantize", "--model", w.ex_big_tokenizer, "--calib",
                                                                w.text, "--out", out],
         "{w.ex_big_tokenizer}/tokenizer.json", "do not belong together"),
    case("quantize-min-agreement-2", lambda w, out: ["quantize", "--model", w.export, "--calib", w.text,
                                                     "--min-agreement", "2", "--out", out], "--min-agreement"),
    case("quantize-calib-samples-0", lambda w, out: ["quantize", "--model", w.export, "--calib", w.text,
                                                     "--calib-samples", "0", "--out", out], "--calib-samples"),
    case("quantize-unknown-target", lambda w, out: ["quantize", "--model", w.export, "--calib", w.text, "--target",
                                                    "sparc", "--out", out], "--target sparc: no such profile"),
    case("quantize-int8-block-size-48", lambda w, out: ["quantize", "--model", w.export, "--calib", w.text,
                                                        "--int8-block-size", "48", "--out", out],
         "--int8-block-size must be a power of two ≥ 16, got 48"),
    # --- package ------------------------------------------------------------------------------------------------------
    case("package-foreign-onnx", lambda w, out: ["package", "--model", w.ex_foreign, "--out", out],
         "{w.ex_foreign}/model.onnx: not written by spj-edge export"),
    case("package-zero-byte-onnx", lambda w, out: ["package", "--model", w.ex_zero, "--out", out],
         "{w.ex_zero}/model.onnx: empty file"),
    case("package-truncated-onnx", lambda w, out: ["package", "--model", w.ex_truncated, "--out", out],
         "{w.ex_truncated}/model.onnx: not"),
    case("package-model-is-a-file", lambda w, out: ["package", "--model", w.export / "model.onnx", "--out", out],
         "{w.export}/model.onnx: expected an export directory", "found a file"),
    case("package-tokenizer-of-another-model", lambda w, out: ["package", "--model", w.ex_big_tokenizer, "--out", out],
         "{w.ex_big_tokenizer}/tokenizer.json", "do not belong together"),
    case("package-binary-tokenizer", lambda w, out: ["package", "--model", w.ex_tokenizer_binary, "--tar",
                                                     "--out", out],
         "{w.ex_tokenizer_binary}/tokenizer.json: not a valid tokenizer.json"),
    # --- the runtime --------------------------------------------------------------------------------------------------
    runtime_case("missing-package", lambda w: w.missing, [], ["{w.missing}: no such package"]),
    runtime_case("zero-byte-archive", lambda w: w.tar_zero, [], ["{w.tar_zero}: not a package"]),
    runtime_case("empty-directory", lambda w: w.empty_dir, [], ["{w.empty_dir}/spj.json: missing from the package"]),
    runtime_case("future-format-version", lambda w: w.pkg_future, [],
                 ["{w.pkg_future}/spj.json: package format version 3; this runtime reads versions 1, 2"]),
    runtime_case("foreign-onnx", lambda w: w.pkg_foreign, [], ["{w.pkg_foreign}: model.onnx's inputs do not follow"]),
    runtime_case("corrupt-tokenizer", lambda w: w.pkg_bad_tokenizer, [],
                 ["{w.pkg_bad_tokenizer}: tokenizer.json is not a valid tokenizer"]),
    runtime_case("tokenizer-of-another-model", lambda w: w.pkg_big_tokenizer, [],
                 ["{w.pkg_big_tokenizer}", "tokenizer.json", "do not belong together"]),
    runtime_case("model-is-a-directory", lambda w: w.pkg_model_dir, [],
                 ["{w.pkg_model_dir}/model.onnx: missing from the package"]),
    runtime_case("binary-manifest", lambda w: w.pkg_manifest_binary, [],
                 ["{w.pkg_manifest_binary}/spj.json: not valid JSON"]),
    runtime_case("manifest-vocab-as-text", lambda w: w.pkg_vocab_text, [],
                 ["{w.pkg_vocab_text}/spj.json: model.vocab_size must be"]),
    runtime_case("manifest-negative-temperature", lambda w: w.pkg_hot_default, [],
                 ["{w.pkg_hot_default}/spj.json", "temperature must be ≥ 0, got -1"]),
    runtime_case("top-p-2", lambda w: w.package, ["--top-p", "2"], ["top_p must be in (0, 1], got 2.0"]),
    runtime_case("temperature-minus-1", lambda w: w.package, ["--temperature", "-1"],
                 ["temperature must be ≥ 0, got -1.0"]),
    runtime_case("threads-0", lambda w: w.package, ["--threads", "0"], ["threads must be ≥ 1, got 0"]),
    runtime_case("prompt-longer-than-context", lambda w: w.package, ["--prompt", LONG_PROMPT],
                 ["prompt is", "the model's context is 128"]),
]


def check_one_line(err: str, code: int, expected_code: int, fragments: list[str]) -> None:
    assert code == expected_code, (code, err[-3000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert err.startswith("spj-edge: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path, monkeypatch, capsys):
    """In a fresh working directory, so that a stray write would show up in it as well."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    before = world.snapshot()
    code = (runtime_main if case.runtime else cli_main)([str(a) for a in case.argv(world, out)])
    err = capsys.readouterr().err
    check_one_line(err, code, case.code, [f.format(w=world, out=out) for f in case.fragments])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not list(work.iterdir())
    assert world.snapshot() == before


def test_the_table_covers_every_verb_and_enough_cases():
    verbs = {c.id.split("-")[0] for c in CASES}
    assert verbs == {"tokenizer", "train", "distill", "prune", "generate", "export", "quantize", "package", "runtime"}
    assert len(CASES) >= 40


def test_demo_refuses_a_data_directory_of_another_layout(world, tmp_path, capsys):
    code = cli_main(["demo", "--data", str(world.empty_dir), "--out", str(tmp_path / "demo")])
    check_one_line(capsys.readouterr().err, code, EXIT_USAGE, [str(world.empty_dir)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["train", "--data", "x", "--steps", "abc"], ["frob"], ["quantize", "--mode", "int3"],
                                  ["runtime", "--model", "x", "--top-p", "abc"]])
def test_a_malformed_flag_is_one_line_not_the_usage(argv, capsys):
    from spj_edge.runtime.__main__ import main as runtime_main

    with pytest.raises(SystemExit) as stop:
        runtime_main(argv[1:]) if argv[0] == "runtime" else cli_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == EXIT_USAGE and len(err.strip().splitlines()) == 1, err
    assert "error: argument" in err and "usage:" not in err, err


# --- as real processes: the exit code a shell sees --------------------------------------------------------------------
def runtime_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spj_edge.runtime", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=REPO, **kwargs)


PROCESS_CASES = {
    "tokenizer-latin1": (lambda w, out: run_cli("tokenizer", "--data", w.latin1, "--out", out),
                         "{w.latin1}: not UTF-8 text"),
    "train-negative-steps": (lambda w, out: run_cli("train", "--preset", "nano", "--data", w.text, "--steps", "-3",
                                                    "--out", out), "--steps must be a positive integer, got -3"),
    "runtime-future-format-version": (lambda w, out: runtime_cli("--model", w.pkg_future, "--prompt", "Hi"),
                                      "{w.pkg_future}/spj.json: package format version 3"),
}


@pytest.mark.parametrize("name", PROCESS_CASES)
def test_bad_input_in_a_real_process(name, world, tmp_path):
    run, fragment = PROCESS_CASES[name]
    out = tmp_path / "out"
    result = run(world, out)
    check_one_line(result.stderr, result.returncode, EXIT_USAGE, [fragment.format(w=world)])
    assert result.stdout == "" and not out.exists()


def without_file_access_override(command: list[str]) -> list[str]:
    """Root reads any file whatever its mode: run `command` without the capabilities that allow it."""
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command] if os.geteuid() == 0 else command


@pytest.mark.parametrize("what", ["text", "manifest"])
def test_an_unreadable_file_is_named(world, tmp_path, what):
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root, which reads any file, and setpriv (util-linux) is missing to drop that power")
    if what == "text":
        unreadable = tmp_path / "secret.txt"
        unreadable.write_text("Readable only by its owner's lawyers.\n")
        command = [sys.executable, "-m", "spj_edge.cli", "tokenizer", "--data", unreadable,
                   "--out", tmp_path / "t.json"]
    else:
        shutil.copytree(world.package, tmp_path / "nano.spj")
        unreadable = tmp_path / "nano.spj" / "spj.json"
        command = [sys.executable, "-m", "spj_edge.runtime", "--model", tmp_path / "nano.spj", "--prompt", "Hi"]
    unreadable.chmod(0)
    result = subprocess.run(without_file_access_override(list(map(str, command))), capture_output=True, text=True,
                            timeout=120, cwd=REPO)
    check_one_line(result.stderr, result.returncode, EXIT_USAGE, [f"{unreadable}: cannot read (Permission denied)"])
    assert not (tmp_path / "t.json").exists()


# --- a full disk ------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of `size` bytes, unmounted afterwards; skips where this process may not mount one."""
    mounts = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounts)}"
        point.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs to fill needs root")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", str(point)], check=True)


@pytest.mark.parametrize("verb", ["export", "package", "package-tar"])
def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(world, small_disk, verb, capsys):
    """The disk holds the model file but not the rest (the tokenizer, the manifest): the stage fails in the middle of
    writing, and the staged output goes with it."""
    model_bytes = (world.export / "model.onnx").stat().st_size
    disk = small_disk(model_bytes + 8192)
    out = disk / "out"
    argv = (["export", "--model", world.checkpoint] if verb == "export" else ["package", "--model", world.export])
    argv += ["--out", out] + (["--tar"] if verb == "package-tar" else [])
    code = cli_main(list(map(str, argv)))
    check_one_line(capsys.readouterr().err, code, EXIT_IO, [str(out), "No space left on device"])
    assert not list(disk.iterdir())


def test_a_full_disk_in_a_real_process(world, small_disk):
    disk = small_disk(64 * 1024)
    result = run_cli("package", "--model", world.export, "--out", disk / "nano.spj")
    check_one_line(result.stderr, result.returncode, EXIT_IO, [str(disk / "nano.spj"), "No space left on device"])
    assert not list(disk.iterdir())
