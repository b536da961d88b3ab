"""A preset's fp32 and int8 packages through `spj-edge bench`, as the device runs them: decode speed, prompt time, peak
memory of each package's own process, size, and the share of the memory-bandwidth bound each reaches.

    .venv/bin/python benchmarks/bench_small.py --preset small --modes static dynamic --chart bench_small.png

What benchmarks/quantize_speed.py adds to this: thread counts, and forward steps alone instead of the runtime.
Random weights (speed does not depend on them), so the int8 models are written with --force: their accuracy gate is
meaningless here and measured on trained models by the demo. The table goes to stderr, the figures to stdout as JSON.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from spj_edge.bench import bench
from spj_edge.checkpoint import save_checkpoint
from spj_edge.config import load_preset
from spj_edge.data import read_texts
from spj_edge.export import export
from spj_edge.model import Transformer
from spj_edge.options import BenchOptions, QuantizeOptions
from spj_edge.package import package
from spj_edge.quantize import quantize
from spj_edge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--modes", nargs="*", default=["static"], help="quantization modes to package beside fp32")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--torch", action="store_true", help="time the PyTorch checkpoint as well")
    ap.add_argument("--chart", help="also write this PNG")
    args = ap.parse_args()
    config = load_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(read_texts([DATA / "ud"]).values(), min(config.vocab_size, 4096))
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", Transformer(config), tokenizer)
        export(tmp / "ckpt", tmp / "fp32")
        for mode in args.modes:
            quantize(tmp / "fp32", tmp / mode, calib=[DATA / "ud"],
                     options=QuantizeOptions(mode=mode, force=True, measure=False, calib_samples=16))
        packages = {name: tmp / f"{name}.spj" for name in ["fp32", *args.modes]}
        for name, path in packages.items():
            package(tmp / name, path)
        figures = bench(list(packages.values()), [tmp / "ckpt"] if args.torch else [],
                        options=BenchOptions(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                             repetitions=args.repetitions, threads=args.threads), chart=args.chart,
                        labels={**{str(path): name for name, path in packages.items()}, str(tmp / "ckpt"): "torch"})
    print(json.dumps({"preset": args.preset, **figures}, indent=2))


if __name__ == "__main__":
    main()
