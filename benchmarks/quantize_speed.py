"""Decode speed of the quantized graphs against float32 on a preset's shape (random weights; `small` by default).

    .venv/bin/python benchmarks/quantize_speed.py --preset small --modes static dynamic int4

Random weights make the accuracy gate meaningless, so the models are written with --force; quality targets are
measured on trained models (the demo and `spj-edge quantize`'s own report). Speeds: batch 1, 32-token prompt,
128 new tokens, forward steps alone through spj_edge.onnx_lm (no sampling), repetitions interleaved, median.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from spj_edge.checkpoint import save_checkpoint
from spj_edge.config import load_preset
from spj_edge.data import read_texts
from spj_edge.export import export
from spj_edge.model import Transformer
from spj_edge.onnx_lm import measure_speed
from spj_edge.options import QuantizeOptions
from spj_edge.quantize import quantize
from spj_edge.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--modes", nargs="+", default=["static", "dynamic", "int4"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    config = load_preset(args.preset)
    texts = read_texts([DATA / "ud"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer = train_tokenizer(texts.values(), config.vocab_size)
        torch.manual_seed(0)
        save_checkpoint(tmp / "ckpt", Transformer(config), tokenizer)
        export(tmp / "ckpt", tmp / "onnx")
        models, result = {"float32": tmp / "onnx" / "model.onnx"}, {}
        for mode in args.modes:
            report = quantize(tmp / "onnx", tmp / mode, calib=[DATA / "ud"],
                              options=QuantizeOptions(mode=mode, force=True, measure=False, calib_samples=16))
            models[mode] = tmp / mode / "model.onnx"
            result[mode] = {"file_mb": round(models[mode].stat().st_size / 1e6, 1), "executed": report["executed"]}
        result["float32"] = {"file_mb": round(models["float32"].stat().st_size / 1e6, 1)}
        for threads in args.threads:
            speed = measure_speed(models, config, 32, 128, args.repetitions, threads)
            for name, figures in speed.items():
                result[name][f"threads_{threads}"] = {"decode_tokens_per_s": round(figures["decode_tokens_per_s"], 1),
                                                      "prompt_ms": round(figures["prompt_ms"], 1)}
    print(json.dumps({"preset": args.preset, **result}, indent=2))


if __name__ == "__main__":
    main()
