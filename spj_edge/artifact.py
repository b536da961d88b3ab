"""Opening what a stage consumes: a checkpoint, an export or a package, each with its config, tokenizer, graph or
weights, and report. Torch-free: the ONNX stages (quantize, package, eval and bench of an export or a package) read
their inputs here and never import torch.

    checkpoint   a directory: config.json + model.safetensors (or its shards) + tokenizer.json [+ report.json]
    export       a directory: model.onnx + config.json + tokenizer.json [+ report.json], from export or quantize
    package      a directory with spj.json, or its .tar.gz, read and verified by spj_edge.runtime

An export's config is the `spj.config` metadata of its graph, the one place it has: it travels with the graph (a graph
quantized by hand keeps it), the package's manifest copies it, and the runtime checks the manifest against it. The
config.json beside the graph is for Hugging Face's tools; no stage reads it from an export.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from .config import SPJConfig
from .errors import SPJError
from .tokenizer import check_matches_model, load_tokenizer

if TYPE_CHECKING:  # onnx is imported when a graph is parsed, the runtime when a package is read
    import onnx

    from .runtime import Package

CONFIG, WEIGHTS, WEIGHTS_INDEX, GRAPH, TOKENIZER, REPORT = (
    "config.json", "model.safetensors", "model.safetensors.index.json", "model.onnx", "tokenizer.json", "report.json")
# What PyTorch, pickle and Lightning name their pickled weights: named in the refusal, never opened.
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")
EXPECTED = ("a checkpoint (config.json, model.safetensors), an ONNX export (model.onnx) or a package (a directory with "
            "spj.json, or its .tar.gz)")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SPJError(f"{path}: {'is a directory, expected a JSON file' if path.is_dir() else 'no such file'}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:  # unreadable input is bad input (exit 2), as for text files (data.read_text)
        raise SPJError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPJError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise SPJError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def parse_onnx(data: bytes, where) -> onnx.ModelProto:
    import onnx

    try:
        proto = onnx.load_from_string(data)
    except Exception as e:  # protobuf's DecodeError and friends
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SPJError(f"{where}: not a valid ONNX model ({reason})") from None
    if not proto.graph.node:
        raise SPJError(f"{where}: not a valid ONNX model (an empty graph)")
    return proto


def _read_report(directory: Path) -> dict:
    return read_json(directory / REPORT) if (directory / REPORT).is_file() else {}


def _loaded_tokenizer(path: Path, config: SPJConfig):
    tokenizer = load_tokenizer(path)
    check_matches_model(tokenizer, config.vocab_size, str(path))
    return tokenizer


# --- the three kinds -------------------------------------------------------------------------------------------------
@dataclass
class CheckpointArtifact:
    kind = "torch"  # the names eval and bench report: a PyTorch checkpoint, an ONNX export, a package
    path: Path
    config: SPJConfig

    @cached_property
    def weight_files(self) -> list[Path]:
        """The safetensors files, one or the shards its index names."""
        directory = self.path
        if (directory / WEIGHTS).is_file():
            return [directory / WEIGHTS]
        if (directory / WEIGHTS).is_dir():
            raise SPJError(f"{directory / WEIGHTS}: is a directory, expected a safetensors file")
        if (directory / WEIGHTS_INDEX).is_file():
            weight_map = read_json(directory / WEIGHTS_INDEX).get("weight_map")
            shards = sorted(set(map(str, weight_map.values()))) if isinstance(weight_map, dict) else []
            if not shards:
                raise SPJError(f"{directory / WEIGHTS_INDEX}: empty or missing weight_map")
            # The index names files beside it; a path (`../x`, `/etc/x`) would read outside the checkpoint.
            for shard in shards:
                if Path(shard).name != shard or shard in ("", ".", ".."):
                    raise SPJError(f"{directory / WEIGHTS_INDEX}: shard {shard!r} is not a file name in the "
                                   "checkpoint")
            return [directory / s for s in shards]
        pickles = sorted(p.name for pattern in PICKLES for p in directory.glob(pattern))
        hint = f" ({', '.join(pickles)}: pickles, which are never loaded: they can run any code)" if pickles else ""
        raise SPJError(f"{directory}: no {WEIGHTS}{hint}")

    @cached_property
    def tokenizer(self):
        return _loaded_tokenizer(self.path / TOKENIZER, self.config)

    @cached_property
    def report(self) -> dict:
        return _read_report(self.path)

    @property
    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files if f.is_file())


@dataclass
class ExportArtifact:
    """Its graph is read when first asked for, as bytes or parsed: a real model's graph is hundreds of megabytes,
    and the stages that only run it give onnxruntime its path."""
    kind = "onnx"
    path: Path

    @property
    def graph_path(self) -> Path:
        return self.path / GRAPH

    @cached_property
    def graph(self) -> bytes:
        return _read_graph(self.graph_path)

    @property
    def weights_path(self) -> Path:
        """Where the weights are when the graph keeps them beside it (ONNX external data)."""
        return self.path / f"{GRAPH}.data"

    @cached_property
    def proto(self) -> onnx.ModelProto:
        """The graph with its weights, wherever they are kept."""
        from onnx.external_data_helper import load_external_data_for_model

        proto = parse_onnx(self.graph if "graph" in self.__dict__ else _read_graph(self.graph_path), self.graph_path)
        if self.weights_path.is_file():
            load_external_data_for_model(proto, str(self.path))
        return proto

    def forget_graph(self) -> None:
        """Let go of the graph's bytes and parse (a real model's weights, twice); they are read again if asked for."""
        self.__dict__.pop("graph", None)
        self.__dict__.pop("proto", None)

    @cached_property
    def metadata(self) -> dict[str, str]:
        """What `spj-edge export` and the quantizer stamp on the graph: spj.config, spj.graph, spj.quantization…
        Read from the graph alone where the weights are kept beside it: packaging a 1B model held its 4.4 GB for
        this."""
        if "proto" in self.__dict__ or not self.weights_path.is_file():
            proto = self.proto
        else:
            proto = parse_onnx(self.graph, self.graph_path)
        return {p.key: p.value for p in proto.metadata_props}

    @cached_property
    def config(self) -> SPJConfig:
        where = f"{self.graph_path}: spj.config"
        if "spj.config" not in self.metadata:
            raise SPJError(f"{self.graph_path}: not written by spj-edge export (its metadata lacks spj.config)")
        try:
            values = json.loads(self.metadata["spj.config"])
        except (ValueError, RecursionError):
            raise SPJError(f"{where}: not valid JSON") from None
        if not isinstance(values, dict):
            raise SPJError(f"{where}: expected a JSON object, found {type(values).__name__}")
        return SPJConfig.from_hf_dict(values, source=where)

    @cached_property
    def tokenizer(self):
        return _loaded_tokenizer(self.path / TOKENIZER, self.config)

    @cached_property
    def report(self) -> dict:
        return _read_report(self.path)

    @property
    def file_bytes(self) -> int:
        weights = self.weights_path
        return self.graph_path.stat().st_size + (weights.stat().st_size if weights.is_file() else 0)

    def check_contract(self, input_names: list[str]) -> None:
        """Refuse a graph whose inputs are not the ONNX contract's for this config: a foreign model, or another's."""
        from . import contract

        c = self.config
        contract.check_inputs(input_names, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, str(self.graph_path))


@dataclass
class PackageArtifact:
    kind = "package"
    path: Path
    package: Package  # the files as read and verified against spj.json
    config: SPJConfig

    @cached_property
    def proto(self) -> onnx.ModelProto:
        from .runtime.reader import MODEL

        return parse_onnx(self.package.files[MODEL], f"{self.path}: {MODEL}")

    @cached_property
    def tokenizer(self):
        from .runtime.generator import package_tokenizer

        return package_tokenizer(self.package)

    @property
    def report(self) -> dict:
        """The manifest: the quantization's accuracy figures and the package's own checks."""
        return self.package.manifest

    @property
    def file_bytes(self) -> int:
        """The archive's size, or the files' of a directory."""
        if self.path.is_file():
            return self.path.stat().st_size
        return sum(entry["bytes"] for entry in self.package.manifest["files"].values())


Artifact = CheckpointArtifact | ExportArtifact | PackageArtifact


# --- opening ---------------------------------------------------------------------------------------------------------
def open_checkpoint(path: str | os.PathLike) -> CheckpointArtifact:
    directory = Path(path)
    if not directory.exists():
        raise SPJError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise SPJError(f"{directory}: expected a checkpoint directory (config.json + model.safetensors), found a file")
    return CheckpointArtifact(directory, SPJConfig.from_hf_dict(read_json(directory / CONFIG),
                                                                source=str(directory / CONFIG)))


def _read_graph(graph_path: Path, size: int = -1) -> bytes:
    try:
        with open(graph_path, "rb") as f:
            graph = f.read(size)
    except OSError as e:
        raise SPJError(f"{graph_path}: cannot read ({e.strerror})") from None
    if not graph:  # protobuf parses zero bytes as an empty model, which would fail later and less clearly
        raise SPJError(f"{graph_path}: empty file (0 bytes), expected an ONNX model")
    return graph


def open_export(path: str | os.PathLike) -> ExportArtifact:
    """An export or quantize output directory: its graph checked readable and not empty now, read when used."""
    directory = Path(path)
    graph_path = directory / GRAPH
    if directory.is_file():
        raise SPJError(f"{directory}: expected an export directory (holding model.onnx), found a file")
    if not graph_path.is_file():
        raise SPJError(f"{graph_path}: no such file (expected the output of `spj-edge export`)")
    _read_graph(graph_path, size=1)
    return ExportArtifact(directory)


def open_package(path: str | os.PathLike) -> PackageArtifact:
    """A package directory or its .tar.gz, every file verified against spj.json."""
    from .runtime import read_package

    package = read_package(path)
    return PackageArtifact(Path(path), package, SPJConfig.from_hf_dict(package.config, source=f"{path}: spj.json"))


def artifact_kind(path: Path) -> str | None:
    """What `path` holds, by its files: "package", "onnx" (an export), "torch" (a checkpoint), or None."""
    if not path.exists():
        raise SPJError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "spj.json").is_file():
            return "package"
        if (path / GRAPH).is_file():
            return "onnx"
        if (path / CONFIG).is_file() and any(path.glob("*.safetensors")):
            return "torch"
        return None
    return "package" if tarfile.is_tarfile(path) else None


OPENERS = {"torch": open_checkpoint, "onnx": open_export, "package": open_package}


def open_artifact(path: str | os.PathLike) -> Artifact:
    """A checkpoint, an export or a package, by what the path holds; refused, naming what was expected, otherwise."""
    path = Path(path)
    kind = artifact_kind(path)
    if kind is None:
        raise SPJError(f"{path}: not a model: expected {EXPECTED}")
    return OPENERS[kind](path)
