"""Build a SlimPajama-style `.jsonl.zst` corpus of about --mb megabytes of text in /tmp for the prepare benchmark:
the paragraphs of ../shared/data's training text (tinyshakespeare's train split, the UD dev sets, PUD), grouped into
documents of 1-16 paragraphs, in a fresh seeded shuffle for every repetition. Repetitions of a few MB of text: good for
throughput and memory, meaningless for what a model would learn from it. Each record names one of three RedPajama
sets, as SlimPajama's do.

    .venv/bin/python benchmarks/prepare_corpus.py --mb 1024 --out /tmp/spj-bench/corpus.jsonl.zst
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import zstandard

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook")


def paragraphs() -> list[str]:
    from spj_edge.data import split_documents

    files = [SHARED / "corpus" / "tinyshakespeare" / "train.txt", *sorted((SHARED / "corpus" / "ud").glob("*_dev.txt")),
             *sorted((SHARED / "parallel" / "pud").glob("*.txt"))]
    found = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        # the UD and PUD files are one sentence a line, with no blank lines: a line is a paragraph there
        found += split_documents(text) if "tinyshakespeare" in str(f) else text.splitlines(keepends=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, required=True, help="megabytes of text (UTF-8) to write")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pieces, rng = paragraphs(), random.Random(args.seed)
    target, written, documents = args.mb * 1e6, 0, 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as writer:
        while written < target:
            order = pieces[:]
            rng.shuffle(order)
            at = 0
            while at < len(order) and written < target:
                size = rng.randint(1, 16)
                text = "".join(order[at:at + size])
                at += size
                record = {"text": text, "meta": {"redpajama_set_name": SETS[documents % 3]}}
                writer.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
                written += len(text.encode("utf-8"))
                documents += 1
    print(f"{args.out}: {written / 1e6:,.0f} MB of text in {documents:,} documents, "
          f"{args.out.stat().st_size / 1e6:,.0f} MB compressed")


if __name__ == "__main__":
    main()
