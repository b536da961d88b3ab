"""Held-out bits per byte of a preset trained on tinyshakespeare for a fixed wall-clock budget (default 5 minutes).

    .venv/bin/python benchmarks/teacher_shakespeare.py --minutes 5 --compile

The anchor is nanoGPT's CPU "baby" Shakespeare run: about 1.88 nats per character (≈ 2.7 bits per byte) in about
3 minutes. Steps are chosen so that the whole run, compilation included, fits the budget: a short timed run measures the
step time first. Prints one JSON line with the figures.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from spj_edge.config import load_preset
from spj_edge.train import TrainOptions, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "tinyshakespeare"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="teacher")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    config = load_preset(args.preset)
    data, held_out = [args.data / "train.txt"], [args.data / "val.txt"]
    budget = args.minutes * 60
    started = time.perf_counter()

    def run(steps: int, out, eval_windows: int = 10_000):
        opts = TrainOptions(steps=steps, batch_size=args.batch_size, lr=args.lr, compile=args.compile,
                            eval_every=max(1, steps // 4), eval_windows=eval_windows)
        return train(config, data, out, opts, val_data=held_out, overwrite=True)

    # Measure the step time: a first short run compiles (if asked; the real run reuses the compiled code), a second
    # one is timed warm.
    run(3, None, eval_windows=1)
    _, _, probe = run(10, None, eval_windows=1)
    step_time = args.batch_size * config.max_position_embeddings / probe["tokens_per_s"]
    remaining = budget - (time.perf_counter() - started)
    steps = max(10, int(remaining * 0.9 / step_time))  # leave room for tokenizing and the evaluations
    with tempfile.TemporaryDirectory() as tmp:
        _, _, report = run(steps, Path(tmp) / "teacher")
    total = time.perf_counter() - started
    print(json.dumps({
        "preset": args.preset, "parameters": report["parameters"], "steps": steps, "batch_size": args.batch_size,
        "tokens_per_s": round(report["tokens_per_s"]), "compile": args.compile,
        "wall_s_total": round(total, 1), "heldout_bits_per_byte": round(report["heldout"]["bits_per_byte"], 4),
        "heldout_tokens": report["heldout"]["tokens"], "anchor_nanogpt_bits_per_byte": 2.71,
    }))


if __name__ == "__main__":
    main()
