"""Hostile packages and requests against the device runtime: each is refused in one line (exit 2) before it can read a
file outside the package, run without end, or allocate gigabytes; and a continuation cut inside a character is
trimmed, not shown broken."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import onnx
import pytest
from tokenizers import Tokenizer

from conftest import REPO, SHAKESPEARE, assert_one_line_error
from spj_edge.data import TEXT_MAX_BYTES, read_text
from spj_edge.errors import SPJError
from spj_edge.config import SPJConfig
from spj_edge.runtime import Generator
from spj_edge.runtime.generator import PROMPT_MAX_BYTES, cores, text_pieces
from test_bad_inputs import rehash


@pytest.fixture(scope="module")
def pkg(untrained) -> Path:
    return untrained / "nano.spj"


def runtime(*args, cwd: Path = REPO, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spj_edge.runtime", *map(str, args)], capture_output=True,
                          text=stdin is None, input=stdin, cwd=cwd, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def with_graph(pkg: Path, target: Path, change) -> Path:
    """A copy of the package whose model.onnx `change` edited, with spj.json vouching for it (hashes that match)."""
    shutil.copytree(pkg, target)
    proto = onnx.load(target / "model.onnx")
    change(proto)
    (target / "model.onnx").write_bytes(proto.SerializeToString())
    return rehash(target)


# --- item 1: a graph may not read files of its own choosing ----------------------------------------------------------
@pytest.mark.parametrize("location, offset, message", [
    ("secret.txt", 0, "reads its data from 'secret.txt' (with ['length', 'location', 'offset']), not from the "
                      "package's model.onnx.data alone"),
    ("../secret.txt", 0, "reads its data from '../secret.txt'"),
    ("/etc/passwd", 0, "reads its data from '/etc/passwd'"),
    ("model.onnx.data", 10**12, "reads bytes 1000000000000-1000000000008 of model.onnx.data, which has"),
])
def test_external_data_is_refused_before_onnxruntime_reads_it(pkg, tmp_path, location, offset, message):
    """The proof of concept: an initializer whose bytes live in a file named relative to the working directory (or
    outside the package, or absolute), or past the end of the package's own weights. onnxruntime would read it."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "secret.txt").write_bytes(bytes(4096))
    (tmp_path / "secret.txt").write_bytes(bytes(4096))

    def external(proto):
        tensor = next(t for t in proto.graph.initializer if t.name == "/lm_head/last_position.index")
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        tensor.external_data.add(key="offset", value=str(offset))
        tensor.external_data.add(key="length", value="8")

    evil = with_graph(pkg, tmp_path / "evil.spj", external)
    assert_one_line_error(runtime("--model", evil, "--prompt", "Hi", cwd=work),
                          f"evil.spj: model.onnx: tensor '/lm_head/last_position.index' {message}")


def test_external_data_needs_the_packages_own_weights_file(pkg, tmp_path):
    """A graph that names model.onnx.data in a package whose manifest lists no such file: a format-1 package whose
    graph would read a file nobody verified."""
    legacy = tmp_path / "legacy.spj"
    shutil.copytree(pkg, legacy)
    manifest = json.loads((legacy / "spj.json").read_text())
    del manifest["files"]["model.onnx.data"]
    (legacy / "spj.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert_one_line_error(runtime("--model", legacy, "--prompt", "Hi"),
                          "keeps its data in another file "
                          "(external data) and the package has no verified model.onnx.data; refusing to load it")


def test_control_flow_and_unknown_ops_are_refused(pkg, tmp_path):
    def loop(proto):  # a Loop with no trip count and a body that never says stop
        body = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["cond"], ["cond_out"])], "forever",
                                      [onnx.helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                                       onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])],
                                      [onnx.helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, [])])
        proto.graph.node.append(onnx.helper.make_node("Loop", ["", "keep_going"], [], body=body))

    def subgraph(proto):  # an allowed op carrying a graph: refused too, whatever onnxruntime would make of it
        proto.graph.node[0].attribute.append(onnx.helper.make_attribute("g", onnx.helper.make_graph([], "g", [], [])))

    def unknown(proto):
        proto.graph.node.append(onnx.helper.make_node("Relu", ["input_ids"], ["relu"]))
        proto.graph.node.append(onnx.helper.make_node("Custom", ["relu"], ["custom"], domain="example.com"))

    for name, change in (("loop", loop), ("subgraph", subgraph)):
        with pytest.raises(SPJError, match=r"model.onnx: has a subgraph \(control flow\), which spj-edge never "
                                           "writes; refusing to load it"):
            Generator.load(with_graph(pkg, tmp_path / f"{name}.spj", change))
    with pytest.raises(SPJError, match="model.onnx: has 'Relu', 'example.com.Custom' nodes, op types spj-edge's "
                                       "exporter and quantizer never write"):
        Generator.load(with_graph(pkg, tmp_path / "unknown.spj", unknown))


# --- item 4 and 5: a manifest must describe its graph, within limits --------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"model__head_dim": 32}, "input past_key_values.0.key is float32 ['batch', 2, 'past_sequence', 16] where "
                              "spj.json's model says float32 ['batch', 2, 'past_sequence', 32]"),
    ({"model__num_key_value_heads": 4}, "where spj.json's model says float32 ['batch', 4, 'past_sequence', 16]"),
    ({"model__vocab_size": 1024}, "output logits is float32 ['batch', 1, 512] where spj.json's model says float32 "
                                  "['batch', 1, 1024]"),
    ({"model__max_position_embeddings": 100000}, "spj.json's model does not describe this graph: "
                                                 "max_position_embeddings 100000 (the graph's: 128)"),
    ({"model__vocab_size": 10**12}, "spj.json: model.vocab_size must be an integer from 1 to 1048576"),
    ({"model__num_hidden_layers": 10**9}, "spj.json: model.num_hidden_layers must be an integer from 1 to 1024"),
    ({"model__num_hidden_layers": 3}, "model.onnx's inputs do not follow the ONNX contract for its config "
                                      "(7 inputs where 3 layers need 9)"),
    ({"special_tokens__bos_token_id": 600}, "special_tokens.bos_token_id is 600, not an id of the model's vocabulary"),
    ({"format_version": True}, "package format version True; this runtime reads versions 1, 2"),
    ({"files__../x": {"sha256": "0" * 64, "bytes": 1}}, "files lists '../x', which is not a file of the package"),
    ({"files__model.onnx__bytes": 2**40}, "files.model.onnx.bytes must be an integer from 0 to"),
    ({"io__outputs": ["logits"]}, "model.onnx's outputs are not spj.json's io.outputs (in order): the manifest "
                                  "describes another graph"),
    ({"io": "input_ids"}, "spj.json: io must hold the graph's inputs and outputs as lists of at most 2051 names"),
])
def test_a_manifest_that_lies_is_refused_in_one_line(pkg, tmp_path, change, message):
    changed = tmp_path / "lies.spj"
    shutil.copytree(pkg, changed)
    rehash(changed)
    manifest = json.loads((changed / "spj.json").read_text())
    for path, value in change.items():
        *parents, key = path.split("__")
        node = manifest
        for parent in parents:
            node = node[parent]
        node[key] = value
    (changed / "spj.json").write_text(json.dumps(manifest))
    assert_one_line_error(runtime("--model", changed, "--prompt", "Hi"), message)


def test_a_deeply_nested_manifest_is_one_line(pkg, tmp_path):
    changed = tmp_path / "nested.spj"
    shutil.copytree(pkg, changed)
    (changed / "spj.json").write_text("[" * 400_000)
    assert_one_line_error(runtime("--model", changed, "--prompt", "Hi"), "spj.json: not a spj-edge package manifest "
                                                                         "(nested too deeply)")


# --- package files: sizes before reads, no links, no FIFOs, no devices ------------------------------------------------
def test_a_file_larger_than_the_manifest_says_is_refused_unread(pkg, tmp_path):
    changed = tmp_path / "big.spj"
    shutil.copytree(pkg, changed)
    with open(changed / "model.onnx", "r+b") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB that take no disk and, read, would take seconds and memory
    with pytest.raises(SPJError, match=f"model.onnx: {3 << 30} bytes where spj.json says"):
        Generator.load(changed)


def test_links_and_fifos_in_a_directory_package_are_named(pkg, tmp_path):
    linked = tmp_path / "linked.spj"
    shutil.copytree(pkg, linked)
    (linked / "model.onnx").rename(tmp_path / "model.onnx")
    (linked / "model.onnx").symlink_to(tmp_path / "model.onnx")
    with pytest.raises(SPJError, match="linked.spj/model.onnx: a symbolic link; a package holds its files"):
        Generator.load(linked)
    fifo = tmp_path / "fifo.spj"
    shutil.copytree(pkg, fifo)
    (fifo / "tokenizer.json").unlink()
    os.mkfifo(fifo / "tokenizer.json")
    with pytest.raises(SPJError, match=r"fifo.spj/tokenizer.json: missing from the package \(a FIFO, device or "
                                       r"socket stands in its place\)"):
        Generator.load(fifo)


@pytest.mark.parametrize("model, message", [
    ("/dev/zero", "/dev/zero: not a package (not a regular file"),
    ("", "an empty path: expected a package directory or its .tar.gz"),
    ("bad\nname.spj", "bad\\nname.spj: no such package"),  # the newline escaped: still one line
])
def test_odd_model_paths_are_one_line(model, message):
    assert_one_line_error(runtime("--model", model, "--prompt", "Hi"), message)


def tar_of(pkg: Path, path: Path, names: list[str], extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            tar.add(pkg / Path(name).name, arcname=name)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_with_dot_slash_names_loads(pkg, tmp_path):
    """`tar czf nano.spj.tar.gz ./nano.spj` writes `./nano.spj/...`."""
    with tarfile.open(tmp_path / "dot.tar.gz", "w:gz") as tar:
        tar.add(pkg, arcname="./nano.spj")
    assert Generator.load(tmp_path / "dot.tar.gz").generate("Hi", max_new_tokens=4, temperature=0) == \
        Generator.load(pkg).generate("Hi", max_new_tokens=4, temperature=0)


def test_a_duplicate_member_is_refused(pkg, tmp_path):
    archive = tar_of(pkg, tmp_path / "twice.tar.gz", ["nano.spj/spj.json", "nano.spj/tokenizer.json",
                                                      "nano.spj/model.onnx", "./nano.spj/model.onnx"])
    with pytest.raises(SPJError, match="member './nano.spj/model.onnx' is in the archive twice"):
        Generator.load(archive)


def test_a_huge_member_is_refused_before_it_is_inflated(pkg, tmp_path):
    """A header that claims 10 GiB, and no data: had the reader moved past it, it would have inflated 10 GiB (or
    found the archive truncated)."""
    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size = size
        return info.tobuf()

    members = b"".join(header(f"nano.spj/{name}", len(data)) + data + bytes(-len(data) % 512)
                       for name, data in ((n, (pkg / n).read_bytes()) for n in ("spj.json", "tokenizer.json")))
    archive = tmp_path / "bomb.tar.gz"
    archive.write_bytes(gzip.compress(members + header("nano.spj/padding", 10 << 30) + bytes(1024)))
    with pytest.raises(SPJError, match=f"member 'nano.spj/padding' is {10 << 30} bytes, more than the {64 << 20} a "
                                       "padding may have"):
        Generator.load(archive)


# --- requests -----------------------------------------------------------------------------------------------------
def test_thread_counts_past_four_per_core_are_refused(pkg):
    for threads in (4 * cores() + 1, 2**40):
        assert_one_line_error(runtime("--model", pkg, "--prompt", "Hi", "--threads", threads),
                              f"threads must be ≤ {4 * cores()}", f"got {threads}")


def test_a_prompt_too_big_is_refused_and_the_next_line_served(pkg):
    generator = Generator.load(pkg)
    with pytest.raises(SPJError, match=f"prompt is {PROMPT_MAX_BYTES + 1} bytes, more than the {PROMPT_MAX_BYTES}"):
        generator.encode("x" * (PROMPT_MAX_BYTES + 1))
    stdin = b"a" * (5 * PROMPT_MAX_BYTES) + b"\nHi\n"
    result = runtime("--model", pkg, "--max-new-tokens", "4", "--temperature", "0", "--no-stream", stdin=stdin)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"line": 1, "error": f"prompt is more than the {PROMPT_MAX_BYTES} bytes this runtime accepts"},
        {"line": 2, "prompt": "Hi", "text": generator.generate("Hi", max_new_tokens=4, temperature=0)}]


def test_a_tokenizer_that_panics_is_one_line(pkg, tmp_path):
    """A pattern that backtracks past Oniguruma's limit makes the Rust side panic (a BaseException in Python, and a
    report written straight to stderr)."""
    changed = tmp_path / "panic.spj"
    shutil.copytree(pkg, changed)
    tokenizer = json.loads((changed / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a*)*$"}, "behavior": "Isolated",
                                  "invert": False}
    (changed / "tokenizer.json").write_text(json.dumps(tokenizer))
    rehash(changed)
    assert_one_line_error(runtime("--model", changed, "--prompt", "a" * 40 + "b"),
                          "panic.spj: tokenizer.json failed on this text")
    served = runtime("--model", changed, "--max-new-tokens", "2", "--no-stream", stdin=b"a" * 40 + b"b\nHi\n")
    assert served.returncode == 0 and served.stderr == b"", served.stderr
    first, second = (json.loads(line) for line in served.stdout.splitlines())
    assert "tokenizer.json failed on this text" in first["error"] and second["prompt"] == "Hi"


# --- issue 12: a continuation cut inside a character -------------------------------------------------------------
def test_a_character_cut_short_is_dropped_but_a_real_replacement_character_is_kept(pkg):
    tokenizer = Tokenizer.from_file(str(pkg / "tokenizer.json"))  # byte-level BPE: 我 is three byte tokens here
    ids = tokenizer.encode("Hi 我", add_special_tokens=False).ids
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")
    assert "".join(text_pieces(tokenizer, ids[:-1])) == "Hi "
    assert "".join(text_pieces(tokenizer, ids)) == "Hi 我"
    real = tokenizer.encode("Hi \ufffd", add_special_tokens=False).ids  # the bytes EF BF BD, a whole character
    assert "".join(text_pieces(tokenizer, real)) == "Hi \ufffd"
    eos = tokenizer.token_to_id("<|eos|>")  # decodes to nothing: the tail before it still counts
    assert "".join(text_pieces(tokenizer, [*ids[:-1], eos])) == "Hi "


# --- the toolchain's side of the same limits -------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a positive finite number, got -1.0"),
    ({"max_position_embeddings": 10**9}, "max_position_embeddings must be ≤ 1048576, got 1000000000"),
    ({"vocab_size": 10**12}, "vocab_size must be ≤ 1048576"),
])
def test_a_config_out_of_range_is_refused(change, message):
    with pytest.raises(SPJError, match=f"model config: {message}"):
        SPJConfig(**change)


def test_a_huge_text_file_is_refused_unread(tmp_path):
    huge = tmp_path / "sparse.txt"
    with open(huge, "wb") as f:
        f.truncate(TEXT_MAX_BYTES + 1)
    with pytest.raises(SPJError, match=f"sparse.txt: {TEXT_MAX_BYTES + 1} bytes, more than the {TEXT_MAX_BYTES}"):
        read_text(huge)
    assert read_text(SHAKESPEARE / "val.txt")
