"""`spj-edge prepare` and training from its shards: the shards hold what the in-memory path tokenizes, the same bytes
for any --workers, a resumed prepare equals an uninterrupted one, training from shards equals training from the same
text in memory and resumes exactly, --weights sets the sources' shares, and a shard of another tokenizer is refused."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zstandard

from conftest import REPO, SHAKESPEARE, UD, assert_one_line_error, cli, run_cli
from spj_edge import prepare as prepare_module
from spj_edge.checkpoint import load_model
from spj_edge.data import MIXTURE_PERIOD, Mixture, split_documents, tokenize_documents
from spj_edge.options import PrepareOptions, TrainOptions
from spj_edge.prepare import Shards, prepare
from spj_edge.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from spj_edge.train import Progress

SETS = ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook")
TRAIN = ["--preset", "nano", "--steps", "6", "--batch-size", "4", "--precision", "fp32", "--eval-every", "3",
         "--eval-windows", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer([(SHAKESPEARE / "val.txt").read_text(encoding="utf-8")], 512), path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """SlimPajama-style chunks of real text in five languages: two .jsonl.zst files, records with a set name."""
    root = tmp_path_factory.mktemp("corpus")
    pieces = [*split_documents((SHAKESPEARE / "val.txt").read_text(encoding="utf-8")),
              *(line for f in sorted(UD.glob("*_dev.txt")) for line in f.read_text(encoding="utf-8").splitlines(True))]
    documents = ["".join(pieces[i:i + 8]) for i in range(0, len(pieces), 8)]
    records = [{"text": d, "meta": {"redpajama_set_name": SETS[i % 3]}} for i, d in enumerate(documents)]
    half = len(records) // 2
    for name, part in (("chunk_0.jsonl.zst", records[:half]), ("chunk_1.jsonl.zst", records[half:])):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()
        (root / name).write_bytes(zstandard.ZstdCompressor().compress(lines))
    return root, records


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "report.json"}


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    prepare([corpus[0]], tokenizer, out, PrepareOptions(workers=1, val_fraction=0.05, shard_tokens=20_000))
    return out


def test_shards_hold_each_source_and_split_as_the_in_memory_path_tokenizes_it(prepared, corpus, tokenizer):
    _, records = corpus
    index = json.loads((prepared / "index.json").read_text())
    assert index["dtype"] == "uint16" and list(index["sources"]) == list(SETS)
    tok = load_tokenizer(tokenizer)
    threshold = 0.05 * 2 ** 64
    for number, name in enumerate(SETS):
        for split in ("train", "val"):
            documents = [r["text"] for r in records if r["meta"]["redpajama_set_name"] == name
                         and (int.from_bytes(hashlib.blake2b(r["text"].encode(), digest_size=8).digest(), "little")
                              < threshold) == (split == "val")]
            entry = index["sources"][name][split]
            assert entry["documents"] == len(documents) > 0
            shards = entry["shards"]
            assert [s["name"] for s in shards] == [f"{split}-{number:04d}-{k:05d}.bin" for k in range(len(shards))]
            assert all(s["tokens"] == 20_000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 20_000
            for s in shards:
                assert hashlib.sha256((prepared / s["name"]).read_bytes()).hexdigest() == s["sha256"]
            stream = np.concatenate([np.fromfile(prepared / s["name"], dtype=np.uint16) for s in shards])
            assert entry["tokens"] == len(stream)
            assert np.array_equal(stream, tokenize_documents(documents, tok))
    val_share = sum(s["val"]["documents"] for s in index["sources"].values()) / len(records)
    assert 0.02 < val_share < 0.09, val_share


def test_same_bytes_for_any_number_of_workers(prepared, corpus, tokenizer, tmp_path):
    out = tmp_path / "two"
    result = cli("prepare", "--data", corpus[0], "--tokenizer", tokenizer, "--out", out, "--workers", "2",
                 "--val-fraction", "0.05", "--shard-tokens", "20000")
    assert result.returncode == 0, result.stderr
    assert files_of(out) == files_of(prepared)
    report = json.loads((out / "report.json").read_text())
    assert report["workers"] == 2 and report["text_bytes"] == sum(len(r["text"].encode()) for r in corpus[1])
    assert "RedPajamaC4 (train)" in result.stderr, "the summary table"


def test_an_interrupted_prepare_continues_from_its_checkpoint(prepared, corpus, tokenizer, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    options = PrepareOptions(workers=1, val_fraction=0.05, shard_tokens=20_000)
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 20_000)  # many chunks, so that it stops half-way
    write_chunk, calls = Shards.write_chunk, []

    def killed_half_way(self, *args):
        """Killed at the worst moment: a chunk finished a shard and began the next, its checkpoint is not written."""
        finished = write_chunk(self, *args)
        calls.append(finished)
        if sum(calls) == 3:
            raise KeyboardInterrupt
        return finished

    monkeypatch.setattr(Shards, "write_chunk", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus[0]], tokenizer, out, options)
    work = tmp_path / ".shards.prepare"
    checkpoint = json.loads((work / "progress.json").read_text())
    assert not out.exists() and checkpoint["position"]["document"] > 0
    written = []
    monkeypatch.setattr(Shards, "write_chunk", lambda self, *a: written.append(len(a[1])) or write_chunk(self, *a))
    prepare([corpus[0]], tokenizer, out, options)
    assert files_of(out) == files_of(prepared)
    assert not work.exists()
    everything = sum(s["tokens"] for splits in json.loads((prepared / "index.json").read_text())["sources"].values()
                     for s in splits.values())
    assert 0 < sum(written) < everything, "the second run tokenized only what the first had not kept"


def test_a_checkpoint_of_other_inputs_is_not_continued(corpus, tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text((SHAKESPEARE / "val.txt").read_text(encoding="utf-8"))
    out = tmp_path / "shards"
    work = tmp_path / ".shards.prepare"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"plan": {"other": 1}}))
    (work / "train-0000-00000.bin").write_bytes(b"\0" * 64)
    prepare([tmp_path / "a.txt"], tokenizer, out, PrepareOptions(val_fraction=0))
    tokens = np.fromfile(out / "train-0000-00000.bin", dtype=np.uint16)
    assert tokens[0] == 1 and tokens[-1] == 2 and (tokens[:32] != 0).all(), "a fresh shard, not the stale one"


def test_a_vocabulary_past_uint16_gets_uint32_shards(tmp_path, tokenizer):
    big = load_tokenizer(tokenizer)
    big.add_tokens([f"<x{i}>" for i in range(1 << 16)])
    save_tokenizer(big, tmp_path / "big.json")
    (tmp_path / "a.txt").write_text("to be <x65535> or not\n")
    prepare([tmp_path / "a.txt"], tmp_path / "big.json", tmp_path / "out", PrepareOptions(val_fraction=0))
    assert json.loads((tmp_path / "out" / "index.json").read_text())["dtype"] == "uint32"
    tokens = np.fromfile(tmp_path / "out" / "train-0000-00000.bin", dtype=np.uint32)
    assert big.token_to_id("<x65535>") in tokens and big.token_to_id("<x65535>") > 65535


def test_training_from_shards_equals_training_from_the_same_text_in_memory(tokenizer, tmp_path):
    """One text file, nothing held out of it (the held-out text is --val-data): the shards are its token stream, so
    the windows, the batches and the weights are the in-memory path's, bit for bit."""
    text = SHAKESPEARE / "val.txt"
    shards = tmp_path / "shards"
    result = cli("prepare", "--data", text, "--tokenizer", tokenizer, "--out", shards, "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    common = [*TRAIN, "--tokenizer", tokenizer, "--val-data", UD / "en_ewt_test.txt"]
    memory, mapped = tmp_path / "memory", tmp_path / "mapped"
    assert cli("train", *common, "--data", text, "--out", memory).returncode == 0
    assert cli("train", *common, "--data", shards, "--out", mapped).returncode == 0
    a, b = load_model(memory).state_dict(), load_model(mapped).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    report = json.loads((mapped / "report.json").read_text())
    assert report["tokens_seen"] == {"val.txt": 6 * 4 * 128}


def test_training_from_shards_resumes_exactly(prepared, tmp_path, monkeypatch):
    """Stopped after step 4 (the checkpoint of step 3 stays), resumed: the weights of the run that never stopped."""
    args = [*TRAIN, "--data", prepared, "--save-every", "3"]
    assert cli("train", *args, "--out", tmp_path / "whole").returncode == 0
    advance = Progress.advance

    def stop_at_step_4(self, **postfix):
        advance(self, **postfix)
        if self.step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "advance", stop_at_step_4)
    assert cli("train", *args, "--out", tmp_path / "stopped").returncode == 130
    assert json.loads((tmp_path / "stopped" / "train_state" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(Progress, "advance", advance)
    assert cli("train", *args, "--out", tmp_path / "stopped", "--resume").returncode == 0
    a, b = load_model(tmp_path / "whole").state_dict(), load_model(tmp_path / "stopped").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    whole, resumed = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("whole", "stopped"))
    assert resumed["tokens_seen"] == whole["tokens_seen"] and sum(whole["tokens_seen"].values()) == 6 * 4 * 128


def test_a_tokenizer_other_than_the_shards_is_refused(prepared, tmp_path):
    other = tmp_path / "other.json"
    save_tokenizer(train_tokenizer([(UD / "fr_gsd_dev.txt").read_text(encoding="utf-8")], 512), other)
    out = tmp_path / "out"
    result = cli("train", *TRAIN, "--data", prepared, "--tokenizer", other, "--out", out)
    assert_one_line_error(result, f"{prepared}: prepared with another tokenizer than {other}")
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--weights", "RedPajamaWiki=1"], "--weights: no source 'RedPajamaWiki' in"),
    (["--weights", "RedPajamaC4"], "--weights: 'RedPajamaC4' is not NAME=W"),
    (["--data", UD / "en_ewt_dev.txt", "--weights", "a=1"], "--weights samples the sources of a prepared --data"),
    (["--data", "PREPARED", UD / "en_ewt_dev.txt"], "prepared token shards are given alone as --data"),
])
def test_bad_weights_and_mixed_data_are_refused(prepared, tmp_path, args, message):
    args = [prepared if a == "PREPARED" else a for a in args]
    data = [] if "--data" in args else ["--data", prepared]
    result = cli("train", *TRAIN, *data, *args, "--out", tmp_path / "out")
    assert_one_line_error(result, message)


def test_weights_set_each_sources_share_of_the_windows(prepared, tmp_path):
    mixture = Mixture.of([0.5, 0.3, 0.2])
    assert mixture.per_period.tolist() == [2048, 1229, 819] and mixture.per_period.sum() == MIXTURE_PERIOD
    for n in (1, 10, 1000, 4096, 10_000):  # any stretch is within one window of its share
        assert np.abs(mixture.counts(n) - n * np.array([0.5, 0.3, 0.2])).max() <= 1
    for k in (0, 5, 4096 + 17, 3 * 4096 + 4095):  # a sample's number within its source counts what came before
        source, number = mixture.locate(k)
        assert number == mixture.counts(k)[source]

    result = cli("train", *TRAIN, "--data", prepared, "--weights", "RedPajamaBook=3,RedPajamaC4=1",
                 "--out", tmp_path / "weighted")
    assert result.returncode == 0, result.stderr
    seen = json.loads((tmp_path / "weighted" / "report.json").read_text())["tokens_seen"]
    assert seen == {"RedPajamaBook": 18 * 128, "RedPajamaC4": 6 * 128}, "3:1 of 24 windows, none of Github"


def test_default_weights_follow_the_tokens(prepared):
    from spj_edge.prepare import load_prepared

    dataset = load_prepared(prepared, load_tokenizer(prepared / "tokenizer.json"), 128, None, 8)
    sizes = np.array([len(w) for w in dataset.sources.values()])
    counts = dataset.mixture.counts(MIXTURE_PERIOD)
    assert np.abs(counts - MIXTURE_PERIOD * sizes / sizes.sum()).max() <= 1
    batch = dataset.train_batch(0, 0, 64)
    assert batch.dtype == np.int64 and batch.shape == (64, 129) and (batch == 1).any() and (batch == 2).any()
    assert len({row.tobytes() for row in batch}) == 64, "no window twice in an epoch"
    assert len(dataset.val) == 8


def test_distill_reads_shards_of_the_teachers_tokenizer_only(prepared, tmp_path):
    teacher = tmp_path / "teacher"
    assert cli("train", *TRAIN, "--data", prepared, "--steps", "2", "--out", teacher).returncode == 0
    student = tmp_path / "student"
    result = cli("distill", "--teacher", teacher, "--preset", "nano", "--data", prepared, *TRAIN[2:], "--out", student)
    assert result.returncode == 0, result.stderr
    assert sum(json.loads((student / "report.json").read_text())["tokens_seen"].values()) == 6 * 4 * 128

    other = tmp_path / "other-teacher"
    assert cli("train", *TRAIN, "--data", UD / "fr_gsd_dev.txt", "--steps", "1", "--out", other).returncode == 0
    result = cli("distill", "--teacher", other, "--preset", "nano", "--data", prepared, *TRAIN[2:],
                 "--out", tmp_path / "refused")
    assert_one_line_error(result, f"{prepared}: prepared with another tokenizer than {other / 'tokenizer.json'}")


@pytest.mark.slow
def test_sigkill_then_the_same_command_gives_the_uninterrupted_shards(corpus, tokenizer, tmp_path):
    """A real SIGKILL at whatever point it lands after the first checkpoint; the files are the OS's, not a mock's."""
    records = corpus[1] * 12  # about 12 MB of text: three 4 MB chunks for the worker, a few seconds of work
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    (tmp_path / "big.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    args = ["prepare", "--data", tmp_path / "big.jsonl.zst", "--tokenizer", tokenizer, "--shard-tokens", "50000"]
    assert run_cli(*args, "--out", tmp_path / "reference").returncode == 0
    out, progress = tmp_path / "killed", tmp_path / ".killed.prepare" / "progress.json"
    process = subprocess.Popen([sys.executable, "-m", "spj_edge.cli", *map(str, args), "--out", str(out)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not progress.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its worker processes, as a machine's crash would
    process.wait()
    assert progress.exists() and not out.exists(), "killed after a checkpoint, before the end"
    resumed = run_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing" in resumed.stderr
    assert files_of(out) == files_of(tmp_path / "reference")
