"""One-command smoke and speed check of a package on this machine (meant for a Raspberry Pi, runs anywhere):

    /opt/spj-edge/venv/bin/python check.py /opt/spj-edge/model.spj.tar.gz [--threads N]

Checks the platform, that the package verifies and loads, that greedy and seeded generation repeat exactly, and
measures what a user feels: a 32-token prompt's time to the first new token, decode tokens/s, and a new process's
time to its first token. Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import struct
import sys

import numpy
import onnxruntime
import tokenizers

from spj_edge.errors import SPJError
from spj_edge.runtime import Generator
from spj_edge.runtime.speed import first_token_s, measure

TEXT = "Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. " * 3
PROMPT_TOKENS, NEW_TOKENS, RUNS = 32, 64, 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, help="default: the runtime's choice")
    args = ap.parse_args()
    failures = []

    def check(ok: bool, what: str):
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    bits = 8 * struct.calcsize("P")
    print(f"{platform.machine()}, {bits}-bit Python {platform.python_version()}; onnxruntime {onnxruntime.__version__}"
          f", numpy {numpy.__version__}, tokenizers {tokenizers.__version__}")
    check(bits == 64, "64-bit Python (onnxruntime has no 32-bit ARM builds)")
    check(onnxruntime.__version__ != "1.21.0", "onnxruntime is not 1.21.0 (it crashes on a Pi 4)")
    try:
        generator = Generator.load(args.package, threads=args.threads)
    except SPJError as e:
        check(False, f"the package loads: {e}")
        return 1
    print(generator.describe())

    # framed as the package's tokenizer frames a prompt (<bos> in front where it puts one), then cut to size
    prompt = generator.tokenizer.encode(TEXT).ids[:min(PROMPT_TOKENS, generator.context // 4)]
    greedy = dict(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    text = generator.generate(prompt, **greedy)
    check(text == generator.generate(prompt, **greedy), "greedy generation repeats exactly")
    seeded = dict(greedy, temperature=0.8, top_p=0.95, seed=1)
    sampled = generator.generate(prompt, **seeded)
    check(sampled == generator.generate(prompt, **seeded), "seeded sampling repeats exactly")
    print(f"     greedy continuation: {text[:120]!r}")

    measure(generator, prompt, 8)  # warm-up
    runs = [measure(generator, prompt, NEW_TOKENS) for _ in range(RUNS)]
    launches = [first_token_s(args.package, TEXT[:40], args.threads) for _ in range(RUNS)]
    print(f"speed: prompt of {len(prompt)} tokens {statistics.median(r.prompt_ms for r in runs):.1f} ms, decode "
          f"{statistics.median(r.tokens_per_s for r in runs):.1f} tokens/s, a new process's first token "
          f"{statistics.median(launches):.2f} s (medians of {RUNS})")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
