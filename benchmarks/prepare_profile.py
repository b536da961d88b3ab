"""Where a `spj-edge prepare` worker's time goes, stage by stage, with each document encoder: the main process's
reading (zstd, JSON, chunking) and sending the texts, then per chunk the worker's encoding (into the shards' array),
the held-out hashing and the result's pickling, and the main process's shard writing. One process, prepare's own code
paths, in MB of text a second.

    .venv/bin/python benchmarks/prepare_profile.py --corpus /tmp/spj-bench/corpus.jsonl.zst --tokenizer tokenizer.json
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from spj_edge import prepare as stage
from spj_edge.options import PrepareOptions, SourceOptions
from spj_edge.sources import BadRecords
from spj_edge.tokenizer import load_tokenizer

STAGES = ("encode", "hash", "result pickle", "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a file prepare reads (prepare_corpus.py's)")
    parser.add_argument("--tokenizer", type=Path, required=True)
    args = parser.parse_args()
    # one thread, as in prepare's workers (read when an encoder first encodes)
    os.environ["RAYON_NUM_THREADS"] = os.environ["FASTOKENS_BPE_THREADS"] = "1"

    started = time.perf_counter()
    chunks = list(stage._chunks(stage._documents([args.corpus], stage.Position(), SourceOptions(), BadRecords(False))))
    read = time.perf_counter() - started
    mb = sum(len(text.encode("utf-8")) for _, _, texts in chunks for text in texts) / 1e6
    started = time.perf_counter()
    for _, _, texts in chunks:
        pickle.loads(pickle.dumps(texts))
    sent = time.perf_counter() - started
    print(f"{mb:.1f} MB in {len(chunks)} chunks; main process: read {mb / read:.0f} MB/s, texts sent "
          f"{mb / sent:.0f} MB/s")

    for encoder in ("fastokens", "tokenizers"):
        tokenizer = load_tokenizer(args.tokenizer)
        tokenizer.use_document_encoder(encoder)
        seconds = dict.fromkeys(STAGES, 0.0)
        with tempfile.TemporaryDirectory() as out:
            shards = stage.Shards(Path(out), np.dtype(np.uint16), 1 << 22)
            for _, sources, texts in chunks:  # prepare._tokenize's steps, timed one by one
                marks = [time.perf_counter()]
                ids, lengths = tokenizer.encode_documents(texts)
                ids = ids.astype(np.uint16)
                marks.append(time.perf_counter())
                val = stage.held_out([t.encode("utf-8") for t in texts], PrepareOptions().val_fraction)
                marks.append(time.perf_counter())
                pickle.loads(pickle.dumps((ids, lengths, val)))
                marks.append(time.perf_counter())
                shards.write_chunk(sources, ids, lengths, val)
                marks.append(time.perf_counter())
                for name, start, end in zip(STAGES, marks, marks[1:]):
                    seconds[name] += end - start
            shards.finish()
        worker = sum(seconds.values()) - seconds["write"]
        print(f"{encoder}: " + ", ".join(f"{name} {mb / s:.1f} MB/s" for name, s in seconds.items())
              + f"; a worker's whole work {mb / worker:.1f} MB/s, {seconds['encode'] / worker:.0%} of it encoding")


if __name__ == "__main__":
    main()
