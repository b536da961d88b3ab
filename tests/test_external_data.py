"""Weights as ONNX external data (model.onnx.data) through every stage, forced on nano: what a graph past protobuf's
2 GiB gets by default. Each stage's output computes what the same stage's inline output computes."""
from __future__ import annotations

import ctypes
import hashlib
import io
import json
import mmap
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SHAKESPEARE, UD, cli
from spj_edge.outputs import write_onnx
from spj_edge.runtime import Generator
from spj_edge.runtime.reader import WEIGHTS_WRITE_BYTES, _copy_hashing
from spj_edge.runtime.step import anonymous_mappings, release_weight_pages, weights_on_huge_pages

CALIB = [UD / "en_ewt_dev.txt", SHAKESPEARE / "val.txt"]
PROMPT, TOKENS = "First Citizen:\nBefore we", 24


@pytest.fixture(scope="module")
def external(nano_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("external")
    assert cli("export", "--model", nano_checkpoint, "--out", root / "onnx", "--external-data").returncode == 0
    return root


def graph_files(directory) -> list[str]:
    return sorted(p.name for p in directory.glob("model.onnx*"))


def test_export_keeps_the_weights_beside_the_graph(external, nano_export):
    out = external / "onnx"
    assert graph_files(out) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    report = json.loads((out / "report.json").read_text())
    assert report["external_data"] and report["checks"]["greedy_identical"]
    graph_only = onnx.load(out / "model.onnx", load_external_data=False)
    assert (out / "model.onnx").stat().st_size < 0.1 * (out / "model.onnx.data").stat().st_size
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in graph_only.graph.initializer
               if np.prod(t.dims) * 4 >= 1024)  # every tensor of 1 KiB or more went out
    inline = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(nano_export / "model.onnx").graph.initializer}
    beside = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(out / "model.onnx").graph.initializer}
    assert inline.keys() == beside.keys() and all(np.array_equal(inline[k], beside[k]) for k in inline)


@pytest.mark.parametrize("mode", ["dynamic", "int4"])
def test_quantize_reads_and_writes_external_data(external, mode):
    out = external / mode
    result = cli("quantize", "--model", external / "onnx", "--out", out, "--mode", mode, "--calib", *CALIB,
                 "--external-data", "--force")
    assert result.returncode == 0, result.stderr[-2000:]
    assert graph_files(out) == ["model.onnx", "model.onnx.data"]
    assert json.loads((out / "report.json").read_text())["mode"] == mode


@pytest.mark.parametrize("source", ["onnx", "dynamic"])
def test_a_package_of_an_external_export_runs_as_the_inline_one(external, nano_package, source):
    if source == "dynamic" and not (external / "dynamic").is_dir():
        cli("quantize", "--model", external / "onnx", "--out", external / "dynamic", "--mode", "dynamic", "--calib",
            *CALIB, "--external-data", "--force")
    out = external / f"{source}.spj"
    assert cli("package", "--model", external / source, "--out", out).returncode == 0
    assert cli("package", "--model", external / source, "--out", out, "--tar").returncode == 0
    # the weights file is copied as it is, never parsed (only the graph gains the last-position Gather)
    assert (out / "model.onnx.data").read_bytes() == (external / source / "model.onnx.data").read_bytes()
    options = dict(max_new_tokens=TOKENS, temperature=0, ignore_eos=True)
    tokens = list(Generator.load(out).tokens(PROMPT, **options))
    assert list(Generator.load(out.with_name(f"{out.name}.tar.gz")).tokens(PROMPT, **options)) == tokens
    if source == "onnx":  # the same float weights as nano_package, kept inline until packaging
        assert list(Generator.load(nano_package).tokens(PROMPT, **options)) == tokens


def test_eval_reads_an_external_export(external, nano_export):
    result = cli("eval", "--model", external / "onnx", "--baseline", nano_export, "--data", SHAKESPEARE / "val.txt",
                 "--json", external / "eval.json")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((external / "eval.json").read_text())
    assert figures["files"][str(SHAKESPEARE / "val.txt")]["top1_agreement"] == 1.0  # the same weights
    sizes = figures["model"]["file_bytes"], figures["baseline"]["file_bytes"]
    assert abs(sizes[0] - sizes[1]) < 0.01 * sizes[1]  # the weights file counts in the model's size


def resident_kib(path) -> tuple[int, int]:
    """How many mappings of `path` this process has, and their resident KiB (/proc/self/smaps)."""
    inode, mappings, resident, counting = str(path.stat().st_ino), 0, 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:
            counting = fields[4] == inode
            mappings += counting
        elif counting and fields[0] == "Rss:":
            resident += int(fields[1])
    return mappings, resident


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_the_runtime_lets_go_of_the_weight_pages_onnxruntime_is_done_with(external, tmp_path):
    """onnxruntime maps model.onnx.data, packs what it computes with into its own memory, and keeps some tensors it
    copied (MatMulNBits' scales on x86): after loading, the runtime holds none of the file's pages, and the pages a
    generation reads again come back from the file unchanged."""
    if not (external / "int4").is_dir():
        cli("quantize", "--model", external / "onnx", "--out", external / "int4", "--mode", "int4", "--calib", *CALIB,
            "--external-data", "--force")
    out = tmp_path / "int4.spj"
    assert cli("package", "--model", external / "int4", "--out", out).returncode == 0
    generator = Generator.load(out)
    mappings, resident = resident_kib(out / "model.onnx.data")
    assert mappings > 0 and resident == 0, (mappings, resident)  # mapped by onnxruntime, nothing of it held
    options = dict(max_new_tokens=TOKENS, temperature=0, ignore_eos=True)
    tokens = list(generator.tokens(PROMPT, **options))
    assert resident_kib(out / "model.onnx.data")[1] > 0  # the embedding's rows, read through the mapping
    assert release_weight_pages(out / "model.onnx.data") > 0
    assert list(generator.tokens(PROMPT, **options)) == tokens


TOUCHES, WEIGHTS_MIB = 64, 32


def resident_after_sparse_reads(path: Path) -> int:
    """The KiB of `path` a process holds after reading one byte in each of TOUCHES pages spread over it through a
    mapping, as a generation reads its tokens' embedding rows through onnxruntime's."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        for page in np.linspace(0, len(mapped) - 1, TOUCHES).astype(np.int64) // mmap.PAGESIZE:
            mapped[int(page) * mmap.PAGESIZE]
        return resident_kib(path)[1]


# A touch maps the folio its page lies in, or the kernel's fault-around window (64 KiB) where that is larger.
SMALL_FOLIOS_KIB = TOUCHES * 2 * WEIGHTS_WRITE_BYTES // 1024


def written_at_once(path: Path) -> bytes:
    """WEIGHTS_MIB of random bytes in one write, on disk and gone from the page cache: read back, they come in as
    the kernel's readahead makes them."""
    data = np.random.default_rng(0).integers(0, 256, WEIGHTS_MIB << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_weights_written_by_a_stage_are_cached_in_small_folios(tmp_path):
    """The weights file a stage writes stays in the page cache in folios no larger than its writes (one tensor's
    bytes at once would make them up to 2 MB), so sparse reads map little of it. Fails with onnx's own writer."""
    table = np.random.default_rng(0).integers(-128, 128, (WEIGHTS_MIB << 10, 1024), dtype=np.int8)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["table", "ids"], ["rows"])], "embedding",
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [None])],
        [onnx.helper.make_tensor_value_info("rows", onnx.TensorProto.INT8, [None, 1024])],
        [onnx.numpy_helper.from_array(table, "table")])
    write_onnx(onnx.helper.make_model(graph), tmp_path / "model.onnx", external_data=True)
    assert (tmp_path / "model.onnx.data").read_bytes() == table.tobytes()
    assert resident_after_sparse_reads(tmp_path / "model.onnx.data") <= SMALL_FOLIOS_KIB


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not Path("/proc/self/smaps").is_file(),
                    reason="reads /proc/self/smaps and evicts with posix_fadvise (Linux)")
def test_the_runtime_reads_and_copies_weights_into_small_folios(tmp_path):
    """Hashing a package's weights reads them without readahead, and a .tar.gz's are inflated in small writes, so
    either way the page cache holds them in small folios and sparse reads through a mapping map little of them.
    Fails with readahead (this VM's 8 MB window caches a sequential read in 2 MB folios) or in 1 MB writes."""
    weights = tmp_path / "model.onnx.data"
    data = written_at_once(weights)
    with open(weights, "rb") as f:
        assert _copy_hashing(f, None, len(data), str(weights)) == hashlib.sha256(data).hexdigest()
    assert resident_after_sparse_reads(weights) <= SMALL_FOLIOS_KIB
    inflated = tmp_path / "inflated.data"
    with open(inflated, "xb") as copy:
        _copy_hashing(io.BytesIO(data), copy, len(data), "archive")
    assert inflated.read_bytes() == data
    assert resident_after_sparse_reads(inflated) <= SMALL_FOLIOS_KIB


def test_a_written_page_of_a_mapped_file_is_kept(tmp_path):
    """A private mapping's page that was written to holds the only copy of what was written: never dropped."""
    (tmp_path / "weights").write_bytes(bytes(range(256)) * 64)
    with open(tmp_path / "weights", "rb") as f:
        copy = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    copy[0], copy[8192] = 255, 7
    assert copy[:2] == bytes([255, 1]) and copy[4096:4098] == bytes([0, 1])
    release_weight_pages(tmp_path / "weights")
    assert copy[0] == 255 and copy[8192] == 7 and copy[1] == 1 and copy[4096:4098] == bytes([0, 1])
    copy.close()


def huge_page_kib(memory: mmap.mmap) -> int:
    """AnonHugePages of the mappings that make up `memory` (madvise splits a mapping at the huge pages' bounds)."""
    first = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    last = first + len(memory)
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            start, end = (int(a, 16) for a in head[0].split("-"))
            inside = start < last and first < end
        elif inside and head[0] == "AnonHugePages:":
            total += int(head[1])
    return total


def written(size: int) -> mmap.mmap:
    """Private anonymous memory of `size` bytes, every page written: what malloc gives a large allocation."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.write(bytes(range(256)) * (size // 256))
    return memory


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="reads /proc/self/smaps (Linux)")
def test_memory_mapped_while_loading_goes_onto_huge_pages():
    """open_session hands weights_on_huge_pages the anonymous mappings from before onnxruntime packed the weights; what
    was mapped since (here memory standing in for them) moves onto huge pages where the kernel allows it (THP not
    off, MADV_COLLAPSE from Linux 6.1), unchanged, and what was mapped before stays as it was."""
    thp = Path("/sys/kernel/mm/transparent_hugepage")
    huge = int((thp / "hpage_pmd_size").read_text()) if thp.is_dir() else 2 << 20
    earlier = written(4 * huge)
    before = anonymous_mappings()
    packed = written(8 * huge)
    moved = weights_on_huge_pages(before)
    mode = (thp / "enabled").read_text() if thp.is_dir() else "[never]"
    kernel = tuple(int(part) for part in re.findall(r"\d+", os.uname().release)[:2])
    if "[never]" in mode or kernel < (6, 1):
        assert moved == 0
    else:
        assert moved >= 7 * huge and huge_page_kib(packed) * 1024 >= 7 * huge, moved
    if "[madvise]" in mode:  # with "always" the kernel may have put it there itself
        assert huge_page_kib(earlier) == 0
    assert packed[:] == earlier[:] * 2 == bytes(range(256)) * (8 * huge // 256)


def test_an_external_exports_config_is_read_without_its_weights(external):
    """The package stage reads the export's config and metadata and copies its weights file as it is: loading the
    weights for the metadata held a 1B model's 4.4 GB through the whole stage (8.6 GB peak, 4.3 GB after)."""
    from spj_edge.artifact import open_export

    export = open_export(external / "onnx")
    assert export.config.num_hidden_layers == 2 and export.metadata["spj.graph"] == "fused"
    assert "proto" not in export.__dict__
    assert export.proto.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # asked for: loaded, whole
