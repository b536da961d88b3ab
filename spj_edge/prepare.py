"""`spj-edge prepare`: tokenize a corpus once into token shards that training memory-maps, as nanoGPT's train.bin and
Megatron-LM's indexed .bin files are, described by one index.json.

The output directory holds
- `{split}-{source:04d}-{shard:05d}.bin`: raw little-endian token ids (uint16 when the vocabulary fits, else uint32)
  of one source's train or val documents, each framed `<bos> document <eos>` as data.tokenize_corpus frames them,
  in corpus order, `shard_tokens` a file (the last of each source and split shorter);
- `index.json`: the format, the tokenizer's sha256, the token type, the held-out rule, and per source its documents
  and tokens per split and its shards (name, tokens, sha256);
- the tokenizer's files, so that `train --data DIR` needs no --tokenizer; `report.json`, the stage's figures.

A document is held out when the first 8 bytes of the BLAKE2b hash of its UTF-8 text, as a number, fall below
val_fraction · 2⁶⁴: the split depends on the text alone, so repeated documents all fall on the same side.

Same inputs, same bytes, whatever --workers: the main process reads the documents in order and hands chunks of them to
worker processes, whose results it writes in the order handed out. The work goes on in `.OUT.prepare` beside the
output and is renamed into place when done; after each finished shard a checkpoint there records how far the input
was read and how long each open shard is, so a killed run started again with the same command continues from it.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .artifact import read_json
from .data import Dataset, Mixture, Windows, find_text_files, tokenizer_sha256, windows
from .errors import SPJError
from .options import PrepareOptions, SourceOptions
from .outputs import check_output, staged_dir, write_json
from .sources import BadRecords, read_documents
from .tables import print_summary
from .tokenizer import TextTokenizer, load_tokenizer, save_tokenizer_files

FORMAT = "spj-edge token shards 1"
INDEX = "index.json"
PROGRESS = "progress.json"  # in the work directory: the last checkpoint
SPLITS = ("train", "val")
CHUNK_BYTES = 4 << 20  # text handed to a worker at a time


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / INDEX).is_file()


# --- the workers ------------------------------------------------------------------------------------------------------
_worker_tokenizer: TextTokenizer | None = None


def _start_worker(tokenizer: str, encoder: str) -> None:
    # One thread a worker, set before the encoder builds its thread pool: --workers says how many cores tokenize
    # (a batch encoding would take them all in every worker).
    os.environ["RAYON_NUM_THREADS"] = os.environ["FASTOKENS_BPE_THREADS"] = "1"
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer)
    _worker_tokenizer.use_document_encoder(encoder)


def _tokenize(texts: list[str], val_fraction: float, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A chunk's documents: their framed ids end to end in the shards' type, each one's length, whether it is held
    out (module docstring), and the chunk's bytes of text."""
    ids, lengths = _worker_tokenizer.encode_documents(texts)
    encoded = [t.encode("utf-8") for t in texts]
    return ids.astype(dtype), lengths, held_out(encoded, val_fraction), sum(map(len, encoded))


def held_out(encoded: list[bytes], val_fraction: float) -> np.ndarray:
    """Which documents (their UTF-8 text) are held out: the module docstring's hash rule."""
    threshold = int(val_fraction * 2 ** 64)
    return np.array([int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") < threshold
                     for b in encoded], dtype=bool)


# --- the shards -------------------------------------------------------------------------------------------------------
@dataclass
class ShardWriter:
    """One source's split: finished shards, and the open one that tokens are appended to."""

    prefix: str  # e.g. train-0003
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)  # finished: name, tokens, sha256
    open_tokens: int = 0
    documents: int = 0
    file = None

    @property
    def open_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):05d}.bin"

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.open_tokens

    def write(self, directory: Path, ids: np.ndarray, documents: int) -> bool:
        """Append; True if a shard was finished."""
        self.documents += documents
        finished = False
        while len(ids):
            if self.file is None:  # a new shard replaces what a killed run may have left under its name
                self.file = (directory / self.open_name).open("ab" if self.open_tokens else "wb")
            room = self.shard_tokens - self.open_tokens
            self.file.write(ids[:room].tobytes())
            self.open_tokens += min(room, len(ids))
            ids = ids[room:]
            if self.open_tokens == self.shard_tokens:
                self.finish(directory)
                finished = True
        return finished

    def finish(self, directory: Path) -> None:
        """Close the open shard (if it holds tokens) and record its hash."""
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.open_tokens:
            self.shards.append({"name": self.open_name, "tokens": self.open_tokens,
                                "sha256": file_sha256(directory / self.open_name)})
            self.open_tokens = 0

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def state(self) -> dict:
        return {"shards": self.shards, "open_tokens": self.open_tokens, "documents": self.documents}

    def restore(self, directory: Path, state: dict) -> None:
        """Continue from a checkpoint: what the open shard gained after it is cut off (and any later shard is
        rewritten when its turn comes)."""
        self.shards, self.open_tokens, self.documents = state["shards"], state["open_tokens"], state["documents"]
        path = directory / self.open_name
        if path.exists():
            os.truncate(path, self.open_tokens * self.dtype.itemsize)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class Shards:
    """Every source's and split's ShardWriter in the work directory, numbered by source in first-seen order."""

    def __init__(self, directory: Path, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.writers: dict[tuple[str, str], ShardWriter] = {}  # (source, split) → its writer
        self.names: list[str] = []  # sources in first-seen order: their number in shard names

    def writer(self, source: str, split: str) -> ShardWriter:
        if source not in self.names:
            self.names.append(source)
        if (source, split) not in self.writers:
            prefix = f"{split}-{self.names.index(source):04d}"
            self.writers[source, split] = ShardWriter(prefix, self.dtype, self.shard_tokens)
        return self.writers[source, split]

    def write_chunk(self, chunk_sources: list[str], ids: np.ndarray, lengths: np.ndarray, val: np.ndarray) -> bool:
        """Append each run of documents of one source and split to its writer; True if a shard was finished."""
        ends, keys = np.cumsum(lengths), list(zip(chunk_sources, val))
        finished, first = False, 0
        for last in range(len(keys)):
            if last + 1 == len(keys) or keys[last + 1] != keys[first]:
                start = ends[first - 1] if first else 0
                target = self.writer(chunk_sources[first], SPLITS[int(val[first])])
                finished |= target.write(self.directory, ids[start:ends[last]], last + 1 - first)
                first = last + 1
        return finished

    def state(self) -> list[dict]:
        """For a checkpoint: what is written so far, flushed to the files."""
        for w in self.writers.values():
            w.flush()
        return [{"source": source, "split": split, "state": w.state()} for (source, split), w in self.writers.items()]

    def restore(self, saved: list[dict]) -> None:
        for entry in saved:
            self.writer(entry["source"], entry["split"]).restore(self.directory, entry["state"])

    def finish(self) -> dict:
        """Close every open shard; index.json's "sources"."""
        for w in self.writers.values():
            w.finish(self.directory)
        return {source: {split: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                         for split in SPLITS if (w := self.writers.get((source, split)))} for source in self.names}

    def move_to(self, directory: Path) -> None:
        for w in self.writers.values():
            for shard in w.shards:
                os.replace(self.directory / shard["name"], directory / shard["name"])


# --- the stage --------------------------------------------------------------------------------------------------------
@dataclass
class Position:
    """How far the input has been read: whole files, then documents of the next one."""

    file: int = 0
    document: int = 0


def _documents(files: list[Path], start: Position, sources: SourceOptions, bad: BadRecords,
               ) -> Iterator[tuple[Position, str, str]]:
    """(the position after it, source, text) of each document from `start` on."""
    for index in range(start.file, len(files)):
        skip = start.document if index == start.file else 0
        for number, (source, text) in enumerate(read_documents(files[index], sources, bad)):
            if number >= skip:
                yield Position(index, number + 1), source, text
        yield Position(index + 1, 0), "", ""  # the file is done (no document)


def _chunks(documents: Iterator[tuple[Position, str, str]]) -> Iterator[tuple[Position, list[str], list[str]]]:
    """Documents in groups of about CHUNK_BYTES of text, each with the position after its last one."""
    names, texts, size, position = [], [], 0, None
    for position, name, text in documents:
        if text:
            names.append(name)
            texts.append(text)
            size += len(text)
        if size >= CHUNK_BYTES:
            yield position, names, texts
            names, texts, size = [], [], 0
    if position is not None:
        yield position, names, texts


@contextlib.contextmanager
def _work_dir(out: Path, plan: dict) -> Iterator[tuple[Path, dict | None]]:
    """`.OUT.prepare` beside `out`, locked against a second prepare of the same output, and the checkpoint found in
    it if it was made by the same plan (else it is emptied: the inputs or settings changed)."""
    work = out.parent / f".{out.name}.prepare"
    work.mkdir(parents=True, exist_ok=True)
    with (work / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SPJError(f"{out}: another spj-edge prepare is writing it") from None
        progress = read_json(work / PROGRESS) if (work / PROGRESS).is_file() else None
        if progress is not None and progress.get("plan") != plan:
            progress = None
        if progress is None:
            for path in work.iterdir():
                if path.name != ".lock":
                    path.unlink()
        try:
            yield work, progress
        except SPJError:  # bad input: what was written is of no use once the input is mended (its plan changes)
            shutil.rmtree(work)
            raise


def prepare(data: list, tokenizer: str | Path, out: str | Path, options: PrepareOptions = PrepareOptions(),
            sources: SourceOptions = SourceOptions(), overwrite: bool = False) -> dict:
    """Tokenize the documents of `data` into shards in `out`; returns the report."""
    out = Path(out)
    check_output(out, [*data, tokenizer], overwrite=overwrite)
    files = find_text_files(data)
    if prepared := [f.parent for f in files if f.name == INDEX and is_prepared(f.parent)]:
        raise SPJError(f"{prepared[0]}: already prepared token shards; give the corpus's own files")
    text_tokenizer = load_tokenizer(tokenizer)
    vocab = text_tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    tokenizer_hash = tokenizer_sha256(text_tokenizer)
    plan = {"format": FORMAT, "tokenizer_sha256": tokenizer_hash, "val_fraction": options.val_fraction,
            "shard_tokens": options.shard_tokens, "sources": vars(sources),
            "inputs": [{"path": str(f), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]}
    bad = BadRecords(sources.skip_bad_records)
    started = time.perf_counter()
    with _work_dir(out, plan) as (work, progress):
        shards = Shards(work, dtype, options.shard_tokens)
        position, text_bytes = Position(), 0
        if progress is not None:
            position, text_bytes = Position(**progress["position"]), progress["text_bytes"]
            done = {str(f) for f in files[:position.file]}  # the partly read file's are counted again as it is read
            bad.counts.update({f: n for f, n in progress["bad_records"]["per_file"].items() if f in done})
            bad.first.update({f: m for f, m in progress["bad_records"]["first_per_file"].items() if f in done})
            shards.restore(progress["shards"])
            print(f"prepare: continuing {out} from its checkpoint ({position.file} of {len(files)} files done)",
                  file=sys.stderr)

        # The encoder is chosen here on the first chunk, so that it is the same whatever --workers.
        chunks = _chunks(_documents(files, position, sources, bad))
        first = next(chunks, None)
        encoder = text_tokenizer.choose_document_encoder(first[2] if first else [])
        chunks = itertools.chain([first] if first else [], chunks)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        # Shown after 2 s (bad input found at once stays one line); in a log file, a line every 15 s.
        bar = tqdm(total=len(files), initial=position.file, desc="prepare", unit="file", dynamic_ncols=True, delay=2,
                   mininterval=0.2 if sys.stderr.isatty() else 15)
        with (bar, _on_interrupt(out),
              concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=context, initializer=_start_worker,
                                                     initargs=(str(tokenizer), encoder)) as pool):
            pending: list = []  # (position after the chunk, its sources, the worker's future), in input order
            while True:
                while len(pending) < 2 * options.workers and (chunk := next(chunks, None)) is not None:
                    after, chunk_sources, texts = chunk
                    pending.append((after, chunk_sources, pool.submit(_tokenize, texts, options.val_fraction,
                                                                      dtype.str)))
                if not pending:
                    break
                after, chunk_sources, future = pending.pop(0)
                ids, lengths, val, chunk_bytes = future.result()
                finished = shards.write_chunk(chunk_sources, ids, lengths, val)
                text_bytes += chunk_bytes
                bar.update(after.file - position.file)
                position = after
                seconds = time.perf_counter() - started
                bar.set_postfix(MB=f"{text_bytes / 1e6:,.0f}", MB_s=f"{text_bytes / 1e6 / seconds:.1f}", refresh=False)
                if finished:
                    write_json(work / PROGRESS, {"plan": plan, "position": vars(position), "text_bytes": text_bytes,
                                                 "bad_records": bad.report(), "shards": shards.state()})
        if not shards.writers:
            raise SPJError(f"{', '.join(map(str, data))}: no documents found"
                           + (f" ({bad.report()['total']} bad records skipped)" if bad.counts else ""))
        index = {"format": FORMAT, "tokenizer_sha256": tokenizer_hash, "dtype": dtype.name,
                 "heldout": {"fraction": options.val_fraction,
                             "rule": "blake2b-64 of the UTF-8 text < fraction·2⁶⁴"},
                 "sources": shards.finish()}
        seconds = time.perf_counter() - started
        report = {"stage": "prepare", "data": [str(p) for p in data], "files": len(files), "text_bytes": text_bytes,
                  "seconds": round(seconds, 2), "mb_per_s": text_bytes / 1e6 / seconds if seconds else None,
                  "workers": options.workers, "encoder": encoder, "bad_records": bad.report(), **index,
                  "peak_rss_mb": {"main": _peak_rss_mb(resource.RUSAGE_SELF),
                                  "workers": _peak_rss_mb(resource.RUSAGE_CHILDREN)}}
        with staged_dir(out) as tmp:
            shards.move_to(tmp)
            save_tokenizer_files(text_tokenizer, tmp)
            write_json(tmp / INDEX, index)
            write_json(tmp / "report.json", report)
        shutil.rmtree(work)
    _print_summary(out, report)
    return report


@contextlib.contextmanager
def _on_interrupt(out: Path) -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        print(f"prepare: interrupted; the same command continues {out} from its last finished shard",
              file=sys.stderr)
        raise


def _peak_rss_mb(who: int) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports KiB


def _print_summary(out: Path, report: dict) -> None:
    rows = [(f"{source} ({split})", f"{figures['documents']:,} documents, {figures['tokens']:,} tokens, "
                                    f"{len(figures['shards'])} shards")
            for source, splits in report["sources"].items() for split, figures in splits.items()]
    rows += [("text", f"{report['text_bytes'] / 1e6:,.1f} MB in {report['seconds']:.1f} s "
                      f"({report['mb_per_s']:.1f} MB/s, {report['workers']} workers, {report['encoder']})"),
             ("bad records skipped", report["bad_records"]["total"]),
             ("peak memory", f"{report['peak_rss_mb']['main']:,.0f} MB (main), "
                             f"{report['peak_rss_mb']['workers']:,.0f} MB (largest worker)")]
    print_summary(f"prepare: {out}", rows)


# --- reading it back --------------------------------------------------------------------------------------------------
def load_prepared(directory: str | Path, tokenizer: TextTokenizer, block_size: int, weights: dict[str, float] | None,
                  eval_windows: int, val_stream: np.ndarray | None = None) -> Dataset:
    """The windows of a prepared directory, memory-mapped shard by shard, sampled by source in the proportions of
    `weights` (None: of their tokens); held out: the windows of `val_stream` if given, else `eval_windows` windows
    spread evenly over its val shards."""
    directory = Path(directory)
    index = read_json(directory / INDEX)
    if index.get("format") != FORMAT:
        raise SPJError(f"{directory / INDEX}: not an index of spj-edge token shards (format {index.get('format')!r})")
    if index["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
        raise SPJError(f"{directory}: prepared with another tokenizer than {tokenizer.source} (its sha256 "
                       f"{index['tokenizer_sha256'][:12]}…); prepare again with this one, or train with "
                       f"{directory / 'tokenizer.json'}")
    dtype = np.dtype(index["dtype"])

    def shard_windows(split: str, source: str) -> list[np.ndarray]:
        parts = []
        for shard in index["sources"][source].get(split, {}).get("shards", []):
            path = directory / shard["name"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise SPJError(f"{path}: {'missing' if size is None else f'{size} bytes'}, the index says "
                               f"{shard['tokens'] * dtype.itemsize}; prepare again")
            rows = shard["tokens"] // (block_size + 1)  # a shard's last, partial window is not used
            if rows:
                parts.append(np.memmap(path, dtype=dtype, mode="r", shape=(rows, block_size + 1)))
        return parts

    train = {source: Windows(shard_windows("train", source)) for source in index["sources"]}
    if weights is None:
        weights = {source: len(w) for source, w in train.items() if len(w)}
    unknown = [name for name in weights if name not in train]
    if unknown:
        raise SPJError(f"--weights: no source {unknown[0]!r} in {directory} (its sources: {', '.join(train)})")
    sampled = {name: w for name, w in weights.items() if w > 0}
    if empty := [name for name in sampled if not len(train[name])]:
        raise SPJError(f"{directory}: source {empty[0]!r} has no training window of {block_size + 1} tokens")
    if not sampled:
        raise SPJError(f"{directory}: too little text for one window of {block_size + 1} tokens")
    if val_stream is not None:
        val = windows(val_stream, block_size)
    else:
        held = Windows([part for source in index["sources"] for part in shard_windows("val", source)])
        picks = np.unique(np.linspace(0, len(held) - 1, num=min(eval_windows, len(held))).astype(int))
        val = held.take(picks) if len(held) else np.empty((0, block_size + 1), dtype=np.int64)
    if not len(val):
        raise SPJError(f"{directory}: no held-out window of {block_size + 1} tokens; prepare with a larger "
                       "--val-fraction, or give --val-data")
    digest = hashlib.sha256((directory / INDEX).read_bytes())
    digest.update(json.dumps([block_size, sampled]).encode())
    digest.update(val.tobytes())
    return Dataset(sources={name: train[name] for name in sampled}, val=val, fingerprint=digest.hexdigest(),
                   mixture=Mixture.of(list(sampled.values())))
