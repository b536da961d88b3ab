"""Documents from the files corpora ship in, each with the name of the source it came from.

- plain text (any other name): paragraphs, as data.split_documents cuts them; the source is the file's name.
- JSON Lines: `.jsonl`, `.jsonl.zst` (SlimPajama's and RedPajama's chunks), `.jsonl.gz` and `.json.gz` (Hugging Face
  datasets' JSON files are JSON Lines): one record a line, its text field one document.
- Parquet (`.parquet`): one record a row, read a batch of rows at a time and only the columns named.

The source of a record is its source field (SlimPajama's `meta.redpajama_set_name`) where it has one, else the file's
name. Decompression and parsing are the libraries': zstandard, the standard library's gzip and json, pyarrow.
A record that cannot be read stops the run with one line naming the file, the line or row and the problem, unless
`skip_bad_records`, which counts it in `BadRecords` instead. A damaged or truncated file always stops it.
"""
from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

from .data import find_text_files, read_text, split_documents
from .errors import SPJError
from .options import SourceOptions

JSONL_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIX = ".parquet"
READ_CHUNK = 1 << 20  # compressed bytes read at a time
PARQUET_BATCH_ROWS = 1024


class BadRecords:
    """Records skipped under --skip-bad-records: a count per file and the first problem seen in each."""

    def __init__(self, skip: bool):
        self.skip, self.counts, self.first = skip, Counter(), {}

    def record(self, path: Path, where: str, problem: str) -> None:
        message = f"{path}: {where}: {problem}"
        if not self.skip:
            raise SPJError(message)
        self.counts[str(path)] += 1
        self.first.setdefault(str(path), message)

    def report(self) -> dict:
        return {"total": sum(self.counts.values()), "per_file": dict(self.counts), "first_per_file": self.first}


def read_documents(path: Path, options: SourceOptions, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """(source name, document text) for each non-empty document of the file, in file order."""
    name = path.name
    if name.endswith(PARQUET_SUFFIX):
        yield from _parquet_documents(path, options, bad)
    elif name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, options, bad)
    elif (text := read_text(path)).strip():  # a file of white space holds no document
        for document in split_documents(text):
            yield name, document


def read_corpus(paths: list, options: SourceOptions) -> tuple[list[str], dict]:
    """Every document of the files in `paths`, in order, for a corpus tokenized in memory; and the bad records
    skipped. No document at all is an error."""
    bad = BadRecords(options.skip_bad_records)
    documents = [text for path in find_text_files(paths) for _, text in read_documents(path, options, bad)]
    if not documents:
        skipped = f"; {bad.report()['total']} bad records skipped" if bad.counts else ""
        raise SPJError(f"{', '.join(map(str, paths))}: no text found (all files are empty{skipped})")
    return documents, bad.report()


# --- JSON Lines -------------------------------------------------------------------------------------------------------
def _jsonl_documents(path: Path, options: SourceOptions, bad: BadRecords) -> Iterator[tuple[str, str]]:
    line_number = 0
    try:
        for line_number, line in enumerate(_lines(path), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                bad.record(path, f"line {line_number}", f"not JSON ({str(e)[:80]})")
                continue
            where = f"line {line_number}"
            document = _document(record, path, where, options, bad)
            if document is not None:
                yield document
    except (EOFError, zlib.error, gzip.BadGzipFile, _zstd_error()) as e:
        kind = "zstd" if path.name.endswith(".zst") else "gzip"
        after = f" after line {line_number}" if line_number else ""
        raise SPJError(f"{path}: damaged or truncated {kind} stream{after} ({_reason(e)})") from None
    except OSError as e:
        raise SPJError(f"{path}: cannot read ({e.strerror or e})") from None


def _lines(path: Path) -> Iterator[bytes]:
    if path.name.endswith(".zst"):
        with path.open("rb") as f:
            yield from _split_lines(_zstd_chunks(f))
    elif path.name.endswith(".gz"):
        with gzip.open(path, "rb") as f:  # raises EOFError where the stream ends early
            yield from f
    else:
        with path.open("rb") as f:
            yield from f


def _zstd_error():
    import zstandard

    return zstandard.ZstdError


def _zstd_chunks(f) -> Iterator[bytes]:
    """The decompressed bytes of every frame in `f`. zstandard's decompressobj rather than its stream_reader: the
    reader ends a truncated stream as if it were complete, the decompressobj says whether its frame ended (`eof`)."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    pending = b""  # compressed bytes not yet fed
    while True:
        data = pending or f.read(READ_CHUNK)
        pending = b""
        if not data:
            break
        yield decompressor.decompress(data)
        if decompressor.eof:  # a frame ended; a file may hold several
            pending = decompressor.unused_data
            decompressor = zstandard.ZstdDecompressor().decompressobj()
            if not pending and not (pending := f.read(READ_CHUNK)):
                return
    if not decompressor.eof:
        raise EOFError("the file ends in the middle of a frame")


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


# --- Parquet ----------------------------------------------------------------------------------------------------------
def _parquet_documents(path: Path, options: SourceOptions, bad: BadRecords) -> Iterator[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
        schema = file.schema_arrow
        text_root, source_root = options.text_field.split(".")[0], options.source_field.split(".")[0]
        if text_root not in schema.names:
            raise SPJError(f"{path}: no column {text_root!r} (the text field {options.text_field!r}; columns: "
                           f"{', '.join(schema.names)})")
        columns = list(dict.fromkeys(c for c in (text_root, source_root) if c in schema.names))
        row = 0
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            # whole records per batch: the nested fields are looked up as JSON Lines records' are
            for record in batch.to_pylist():
                row += 1
                document = _document(record, path, f"row {row}", options, bad)
                if document is not None:
                    yield document
    except (pa.ArrowException, OSError) as e:
        raise SPJError(f"{path}: not a readable Parquet file ({_reason(e)})") from None


# --- records ----------------------------------------------------------------------------------------------------------
_MISSING = object()


def _field(record, dotted: str):
    for key in dotted.split("."):
        if not isinstance(record, dict) or key not in record:
            return _MISSING
        record = record[key]
    return record


def _document(record, path: Path, where: str, options: SourceOptions, bad: BadRecords) -> tuple[str, str] | None:
    """The record's (source, text), or None for an empty text or a bad record that is skipped."""
    if not isinstance(record, dict):
        bad.record(path, where, f"{_json_type(record)}, expected an object")
        return None
    text = _field(record, options.text_field)
    if text is _MISSING or text is None:
        bad.record(path, where, f"no {options.text_field!r} field")
        return None
    if not isinstance(text, str):
        bad.record(path, where, f"{options.text_field!r} is {_json_type(text)}, expected a string")
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON: no UTF-8 form, tokenizers refuses it
        bad.record(path, where, f"{options.text_field!r} holds {text[e.start:e.end]!a}, which has no UTF-8 form")
        return None
    source = _field(record, options.source_field)
    if source is _MISSING or source is None:
        source = path.name
    elif not isinstance(source, str) or not source:
        bad.record(path, where, f"{options.source_field!r} is {source!r}, expected a source name")
        return None
    return (source, text) if text.strip() else None


def _json_type(value) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), f"a {type(value).__name__}")


def _reason(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0][:120]
