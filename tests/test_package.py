"""`spj-edge package`: the files and manifest, the last-position LM head, the .tar.gz, and bad input."""
import hashlib
import json
import tarfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from conftest import assert_one_line_error, cli, logit_bound
from spj_edge import contract
from spj_edge.errors import SPJError
from spj_edge.artifact import open_export
from spj_edge.onnx_lm import OnnxLM
from spj_edge.outputs import MARKER
from spj_edge import package as package_module
from spj_edge.options import PackageOptions
from spj_edge.package import CHECK_PROMPT, CHECK_TOKENS, package
from spj_edge.runtime import Generator
from spj_edge.tokenizer import load_tokenizer, special_token_ids


@pytest.fixture(scope="module", params=["fused", "plain"])
def exported(request):
    """The session's exports of nano_checkpoint (conftest), each packaged by this module on its own."""
    return request.getfixturevalue("nano_export" if request.param == "fused" else "nano_plain_export")


@pytest.fixture(scope="module")
def graph_kind(exported):
    return json.loads((exported / "report.json").read_text())["graph"]


@pytest.fixture(scope="module")
def packaged(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "nano.spj"
    return out, package(exported, out)


def test_files_and_manifest(exported, graph_kind, packaged):
    out, report = packaged
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.onnx", "model.onnx.data", "spj.json",
                                                     "tokenizer.json"]
    manifest = json.loads((out / "spj.json").read_text())
    assert report["out"] == str(out) and {k: report[k] for k in manifest} == manifest
    config = json.loads((exported / "config.json").read_text())
    assert manifest["format_version"] == 2 and manifest["model"] == config
    shape = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
    assert manifest["io"] == {"inputs": [s.name for s in contract.inputs(*shape)],
                              "outputs": [s.name for s in contract.outputs(*shape, config["vocab_size"])]}
    assert manifest["opset"] == 17 and manifest["graph"] == graph_kind
    assert manifest["quantization"] == {"mode": "none", "target": None, "accuracy": {}}
    assert manifest["special_tokens"] == {**special_token_ids(load_tokenizer(out / "tokenizer.json")),
                                          "eos_token_ids": [2], "add_bos_token": True}
    assert manifest["chat_template"] is None  # our presets' tokenizers have none
    assert manifest["generation"] == {"max_new_tokens": 128, "temperature": 0.8, "top_k": 0, "top_p": 0.95,
                                      "repetition_penalty": 1.0}
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        # readable by whoever may read the graph (a service user): onnx creates the weights file private
        assert (out / name).stat().st_mode & 0o777 == (out / "tokenizer.json").stat().st_mode & 0o777
    assert (out / "tokenizer.json").read_bytes() == (exported / "tokenizer.json").read_bytes()
    assert manifest["logits"] == "last"
    assert manifest["checks"]["package"] == {"greedy_tokens": 32, "greedy_identical": True}
    assert manifest["checks"]["source"]["greedy_identical"]


def test_the_lm_head_reads_the_last_position_only(exported, packaged):
    out, _ = packaged
    proto = onnx.load(out / "model.onnx")
    onnx.checker.check_model(proto)
    logits = proto.graph.output[0]
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, 512]
    head = next(n for n in proto.graph.node if n.name == "/lm_head/MatMul")
    assert head.input[0] == "/lm_head/last_position/Gather_output_0"
    source_meta = {p.key: p.value for p in onnx.load(exported / "model.onnx").metadata_props}
    assert {p.key: p.value for p in proto.metadata_props} == source_meta

    # A left-padded batch of two: the packaged graph's one row is the full graph's last row, the cache is the same.
    config = json.loads((out / "spj.json").read_text())["model"]
    ids = np.array([[1, 40, 50, 60, 70, 80], [0, 0, 0, 1, 90, 100]], np.int64)
    mask = (np.arange(6) >= np.array([[0], [3]])).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)}
    for spec in contract.inputs(config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"])[3:]:
        feed[spec.name] = np.zeros((2, config["num_key_value_heads"], 0, config["head_dim"]), np.float32)
    full, *full_cache = ort.InferenceSession(exported / "model.onnx").run(None, feed)
    last, *cache = ort.InferenceSession(out / "model.onnx").run(None, feed)
    assert last.shape == (2, 1, 512)
    assert np.abs(last[:, 0] - full[:, -1]).max() < logit_bound(full[:, -1])
    for a, b in zip(cache, full_cache):
        np.testing.assert_array_equal(a, b)


def test_a_quantized_head_is_sliced_in_front_of_its_quantization(exported, tmp_path):
    """ONNX Runtime fuses DynamicQuantizeLinear → MatMulInteger (and Q → DQ → MatMul): no Gather between them."""
    source = tmp_path / "int8"
    source.mkdir()
    quantize_dynamic(exported / "model.onnx", source / "model.onnx", op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    (source / "tokenizer.json").write_bytes((exported / "tokenizer.json").read_bytes())
    report = package(source, tmp_path / "int8.spj")
    assert report["logits"] == "last" and report["checks"]["package"]["greedy_identical"]
    nodes = onnx.load(tmp_path / "int8.spj" / "model.onnx").graph.node
    consumer = next(n for n in nodes if "/lm_head/last_position/Gather_output_0" in n.input)
    assert consumer.op_type == "DynamicQuantizeLinear"


def test_a_package_that_departs_from_its_source_is_refused_and_nothing_written(nano_export, nano_package, tmp_path,
                                                                               monkeypatch):
    """The package check's failing branch (spj.json's greedy_identical is only ever written true, because a package
    whose greedy continuation departs from its source graph's is refused). The defect: the LM head's slice reads the
    first position instead of the last. Decode steps feed one position, so only the prompt's step differs."""
    slice_last = package_module.last_position_logits

    def slice_first(proto, config):
        sliced = slice_last(proto, config)
        index = next(i for i in proto.graph.initializer if i.name == "/lm_head/last_position.index")
        index.CopyFrom(onnx.numpy_helper.from_array(np.array([0], np.int64), index.name))
        return sliced

    # the defect shows from the first token on: after the whole prompt nano predicts another token than after <bos>
    ids = np.array([Generator.load(nano_package).encode(CHECK_PROMPT)])  # as the check encodes it
    export = open_export(nano_export)
    lm = OnnxLM(export.graph_path, export.config)
    logits = lm.logits(ids)
    assert logits[0, 0].argmax() != logits[0, -1].argmax(), "this defect would not change the first token"

    monkeypatch.setattr(package_module, "last_position_logits", slice_first)
    for tar in (False, True):
        with pytest.raises(SPJError, match=f"^package check failed: the packaged model's greedy continuation departs "
                                           f"from the source graph's at token 0 of {CHECK_TOKENS}; nothing written$"):
            package(nano_export, tmp_path / "nano.spj", PackageOptions(tar=tar))
        assert not list(tmp_path.iterdir())


def test_tar_holds_one_folder_and_runs_like_the_directory(exported, packaged, tmp_path):
    out, _ = packaged
    report = package(exported, tmp_path / "nano.spj", PackageOptions(tar=True))
    archive = tmp_path / "nano.spj.tar.gz"
    assert report["out"] == str(archive) and sorted(p.name for p in tmp_path.iterdir()) == ["nano.spj.tar.gz"]
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["nano.spj", "nano.spj/model.onnx", "nano.spj/model.onnx.data",
                                          "nano.spj/spj.json", "nano.spj/tokenizer.json"]
    options = dict(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    assert (list(Generator.load(archive).tokens("The king", **options))
            == list(Generator.load(out).tokens("The king", **options)))


def test_overwrite_replaces_and_the_default_refuses(exported, packaged):
    out, _ = packaged
    with pytest.raises(SPJError, match="already exists"):
        package(exported, out)
    package(exported, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.onnx", "model.onnx.data", "spj.json",
                                                     "tokenizer.json"]


@pytest.mark.parametrize("case", ["no-dir", "not-onnx", "no-metadata", "no-tokenizer"])
def test_bad_input_writes_nothing(exported, tmp_path, case):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("model.onnx", "tokenizer.json", "config.json"):
        (source / name).write_bytes((exported / name).read_bytes())
    if case == "no-dir":
        source, fragment = tmp_path / "nothing", "nothing/model.onnx: no such file"
    elif case == "not-onnx":
        (source / "model.onnx").write_bytes(b"\x00not a protobuf\xff" * 10)
        fragment = "model.onnx: not a valid ONNX model"
    elif case == "no-metadata":
        proto = onnx.load(source / "model.onnx")
        del proto.metadata_props[:]
        onnx.save(proto, source / "model.onnx")
        fragment = "model.onnx: not written by spj-edge export (its metadata lacks spj.config"
    else:
        (source / "tokenizer.json").unlink()
        fragment = "tokenizer.json: no such file"
    with pytest.raises(SPJError, match=fragment.replace("(", r"\(")):
        package(source, tmp_path / "dist" / "x.spj")
    assert not (tmp_path / "dist").exists() or not list((tmp_path / "dist").iterdir())


# --- through the CLI (once `spj-edge package` is wired into cli.py) ------------------------------------------------
def test_cli_writes_a_tar_package(exported, tmp_path):
    result = cli("package", "--model", exported, "--out", tmp_path / "dist" / "nano.spj", "--tar")
    assert result.returncode == 0, result.stderr
    assert isinstance(Generator.load(tmp_path / "dist" / "nano.spj.tar.gz").generate("Hi", max_new_tokens=4), str)


def test_cli_bad_input_is_one_line(tmp_path):
    assert_one_line_error(cli("package", "--model", tmp_path / "nothing", "--out", tmp_path / "x.spj"),
                          "nothing/model.onnx: no such file")
