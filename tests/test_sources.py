"""Reading documents from the formats corpora ship in (sources.py), on real text, and every kind of bad record: one
line naming the file, the line or row and the problem, or counted with --skip-bad-records; never a traceback, never an
empty corpus."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import SHAKESPEARE, assert_one_line_error, cli
from spj_edge.data import split_documents
from spj_edge.errors import SPJError
from spj_edge.options import SourceOptions
from spj_edge.sources import BadRecords, read_corpus, read_documents

SETS = ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook")


@pytest.fixture(scope="module")
def records():
    """Paragraphs of real text as SlimPajama's records: a text and meta.redpajama_set_name, one in five without it."""
    paragraphs = [p for p in split_documents((SHAKESPEARE / "val.txt").read_text(encoding="utf-8"))][:300]
    return [{"text": text, "meta": {"redpajama_set_name": SETS[i % 3]} if i % 5 else {}}
            for i, text in enumerate(paragraphs)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write(path, records):
    """`records` in the format `path`'s name says."""
    name = path.name
    if name.endswith(".zst"):
        # two frames, as zstd's multi-threaded writers and concatenated chunks make
        half = len(records) // 2
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl(records[:half]))
                         + zstandard.ZstdCompressor().compress(jsonl(records[half:])))
    elif name.endswith(".gz"):
        path.write_bytes(gzip.compress(jsonl(records)))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=64)
    else:
        path.write_bytes(jsonl(records))
    return path


def expected(records, name):
    return [(r["meta"].get("redpajama_set_name", name), r["text"]) for r in records if r["text"].strip()]


@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.zst", "c.jsonl.gz", "c.json.gz", "c.parquet"])
def test_every_format_gives_the_records_in_order_with_their_source(tmp_path, records, name):
    path = write(tmp_path / name, records)
    bad = BadRecords(skip=False)
    got = list(read_documents(path, SourceOptions(), bad))
    assert got == expected(records, name)
    assert {source for source, _ in got} == {*SETS, name}, "a record without the field is the file's"
    assert bad.report()["total"] == 0


def test_text_files_are_paragraphs_named_by_the_file(tmp_path):
    text = (SHAKESPEARE / "val.txt").read_text(encoding="utf-8")
    got = list(read_documents(SHAKESPEARE / "val.txt", SourceOptions(), BadRecords(skip=False)))
    assert "".join(t for _, t in got) == text and len(got) > 100
    assert {source for source, _ in got} == {"val.txt"}
    (tmp_path / "blank.txt").write_text(" \n\n ")
    assert list(read_documents(tmp_path / "blank.txt", SourceOptions(), BadRecords(skip=False))) == []


def test_nested_text_and_source_fields(tmp_path, records):
    nested = [{"content": {"body": r["text"]}, "origin": f"set{i % 2}"} for i, r in enumerate(records)]
    for name in ("n.jsonl", "n.parquet"):
        path = write(tmp_path / name, nested)
        got = list(read_documents(path, SourceOptions(text_field="content.body", source_field="origin"),
                                  BadRecords(skip=False)))
        assert [t for _, t in got] == [r["text"] for r in records if r["text"].strip()]
        assert {s for s, _ in got} == {"set0", "set1"}


GOOD = '{"text": "a good record"}\n'


def truncated_zst(path):
    """Half of 1 MB of real text: the first of its 128 KB zstd blocks whole."""
    text = (SHAKESPEARE / "train.txt").read_text(encoding="utf-8")
    whole = zstandard.ZstdCompressor().compress(jsonl([{"text": p} for p in split_documents(text)]))
    path.write_bytes(whole[: len(whole) // 2])


# (file name, how to write it, what the one line says)
BAD = {
    "not JSON": ("bad.jsonl", lambda p: p.write_text(GOOD * 2 + '{"text": "cut off\n'),
                 "bad.jsonl: line 3: not JSON"),
    "no field": ("bad.jsonl", lambda p: p.write_text(GOOD + '{"content": "x"}\n'),
                 "bad.jsonl: line 2: no 'text' field"),
    "number": ("bad.jsonl", lambda p: p.write_text(GOOD + '{"text": 42}\n'),
               "bad.jsonl: line 2: 'text' is a number, expected a string"),
    "array": ("bad.jsonl", lambda p: p.write_text('["text"]\n'), "bad.jsonl: line 1: an array, expected an object"),
    "surrogate": ("bad.jsonl", lambda p: p.write_text(GOOD + '{"text": "a \\ud800 b"}\n'),
                  "bad.jsonl: line 2: 'text' holds '\\ud800', which has no UTF-8 form"),
    "not UTF-8": ("bad.jsonl.gz", lambda p: p.write_bytes(gzip.compress(GOOD.encode() + b'{"text": "caf\xe9"}\n')),
                  "bad.jsonl.gz: line 2: not JSON"),
    "bad source": ("bad.jsonl", lambda p: p.write_text(GOOD + '{"text": "x", "meta": {"redpajama_set_name": 7}}\n'),
                   "bad.jsonl: line 2: 'meta.redpajama_set_name' is 7, expected a source name"),
    "truncated zst": ("bad.jsonl.zst", truncated_zst, "bad.jsonl.zst: damaged or truncated zstd stream after line"),
    "not zstd": ("bad.jsonl.zst", lambda p: p.write_text(GOOD), "bad.jsonl.zst: damaged or truncated zstd stream"),
    "truncated gz": ("bad.jsonl.gz", lambda p: p.write_bytes(gzip.compress(GOOD.encode() * 1000)[:-30]),
                     "bad.jsonl.gz: damaged or truncated gzip stream"),
    "no column": ("bad.parquet", lambda p: pq.write_table(pa.table({"content": ["x"]}), p),
                  "bad.parquet: no column 'text' (the text field 'text'; columns: content)"),
    "null row": ("bad.parquet", lambda p: pq.write_table(pa.table({"text": ["ok", None, "ok"]}), p),
                 "bad.parquet: row 2: no 'text' field"),
    "int column": ("bad.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p),
                   "bad.parquet: row 1: 'text' is a number, expected a string"),
    "not parquet": ("bad.parquet", lambda p: p.write_text(GOOD), "bad.parquet: not a readable Parquet file"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_naming_file_and_record(tmp_path, case, nano_tokenizer):
    name, make, message = BAD[case]
    make(tmp_path / name)
    out = tmp_path / "out"
    result = cli("prepare", "--data", tmp_path / name, "--tokenizer", nano_tokenizer, "--out", out)
    assert_one_line_error(result, message)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [name], "nothing left behind"


@pytest.fixture(scope="module")
def nano_tokenizer(tmp_path_factory):
    from spj_edge.tokenizer import save_tokenizer, train_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    save_tokenizer(train_tokenizer([(SHAKESPEARE / "val.txt").read_text(encoding="utf-8")], 512), path)
    return path


def test_skip_bad_records_counts_them_and_keeps_the_rest(tmp_path, nano_tokenizer):
    good = [{"text": f"record {i} has some words"} for i in range(40)]
    lines = [json.dumps(r) for r in good]
    lines[3], lines[17] = "{not json", '{"text": null}'
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    bad = BadRecords(skip=True)
    documents = list(read_documents(tmp_path / "c.jsonl", SourceOptions(skip_bad_records=True), bad))
    assert len(documents) == 38
    assert bad.report()["per_file"] == {str(tmp_path / "c.jsonl"): 2}
    assert "line 4: not JSON" in bad.report()["first_per_file"][str(tmp_path / "c.jsonl")]

    out = tmp_path / "out"
    result = cli("prepare", "--data", tmp_path / "c.jsonl", "--tokenizer", nano_tokenizer, "--out", out,
                 "--skip-bad-records", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["bad_records"]["total"] == 2
    assert report["sources"]["c.jsonl"]["train"]["documents"] == 38


def test_only_bad_records_is_never_an_empty_corpus(tmp_path, nano_tokenizer):
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n' * 5)
    with pytest.raises(SPJError, match="no text found"):
        read_corpus([tmp_path / "c.jsonl"], SourceOptions(skip_bad_records=True))
    out = tmp_path / "out"
    result = cli("prepare", "--data", tmp_path / "c.jsonl", "--tokenizer", nano_tokenizer, "--out", out,
                 "--skip-bad-records")
    assert_one_line_error(result, "no documents found (5 bad records skipped)")
    assert not out.exists()


def test_field_flags_are_checked():
    with pytest.raises(SPJError, match="--text-field must name a field"):
        SourceOptions(text_field="meta.")


def test_train_reads_json_lines_in_memory_and_skips_bad_records_when_asked(tmp_path, records, nano_tokenizer):
    lines = jsonl(records).decode().splitlines(keepends=True)
    lines[10] = '{"text": 3}\n'
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    args = ["train", "--preset", "nano", "--data", tmp_path / "c.jsonl.gz", "--tokenizer", nano_tokenizer,
            "--steps", "2", "--batch-size", "4", "--precision", "fp32"]
    assert_one_line_error(cli(*args, "--out", tmp_path / "refused"),
                          "c.jsonl.gz: line 11: 'text' is a number, expected a string")
    result = cli(*args, "--out", tmp_path / "run", "--skip-bad-records")
    assert result.returncode == 0, result.stderr
    assert "warning: skipped 1 bad records (first: " in result.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["bad_records"]["total"] == 1 and report["tokens_seen"] == {"data": 2 * 4 * 128}
