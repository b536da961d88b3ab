"""Plain vs fused ONNX graphs: node count, file size, export time and decode speed with a plain onnxruntime loop.

    .venv/bin/python benchmarks/onnx_decode.py --preset small --prompt 32 --new 128 --repetitions 5

Random weights (speed does not depend on them). Batch 1; decode tokens/s counts only the single-token steps after the
prompt; repetitions alternate between the graphs and the median is reported. Both graphs are checked against PyTorch
first (the export's own verification), so the speed is of graphs known to be right.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
import torch

from spj_edge import contract
from spj_edge.export import export_plain, verify
from spj_edge.model import Transformer, load_preset
from spj_edge.onnx_fused import build_fused_model


def decode_rate(session: ort.InferenceSession, config, prompt: int, new: int, rng) -> tuple[float, float]:
    """(prompt ms, decode tokens/s) of one greedy generation."""
    L, kv, hd = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    past = {contract.past_name(i, k): np.zeros((1, kv, 0, hd), np.float32) for i in range(L) for k in ("key", "value")}
    ids = rng.integers(3, config.vocab_size, (1, prompt))
    output_names = [o.name for o in session.get_outputs()]
    length = 0
    timings = []
    for step in range(new + 1):
        length += ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, length), np.int64),
                "position_ids": np.arange(length - ids.shape[1], length)[None], **past}
        start = time.perf_counter()
        logits, *present = session.run(output_names, feed)
        timings.append(time.perf_counter() - start)
        past = dict(zip(past, present))
        ids = logits[:, -1:].argmax(-1)
    return timings[0] * 1000, new / sum(timings[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = Transformer(load_preset(args.preset)).eval()
    graphs, result = {}, {}
    for kind, build in (("plain", export_plain), ("fused", build_fused_model)):
        start = time.perf_counter()
        proto = build(model, args.opset)
        export_s = time.perf_counter() - start
        checks = verify(proto, model, list(range(1, 17)), decode_steps=8, continuation=8)
        data = proto.SerializeToString()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        graphs[kind] = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        result[kind] = {"nodes": len(proto.graph.node), "file_mb": round(len(data) / 1e6, 2),
                        "export_s": round(export_s, 2), "max_abs_diff": max(
                            checks["prefill_max_abs_diff"], checks["decode_max_abs_diff"])}
    rng = np.random.default_rng(0)
    for session in graphs.values():  # warm-up
        decode_rate(session, model.config, args.prompt, 8, rng)
    runs = {kind: [] for kind in graphs}
    for _ in range(args.repetitions):
        for kind, session in graphs.items():
            runs[kind].append(decode_rate(session, model.config, args.prompt, args.new, rng))
    for kind, samples in runs.items():
        rates = [r for _, r in samples]
        result[kind].update(decode_tokens_per_s=round(statistics.median(rates), 1),
                            decode_min_max=[round(min(rates), 1), round(max(rates), 1)],
                            prompt_ms=round(statistics.median(p for p, _ in samples), 2))
    result["fused_speedup"] = round(result["fused"]["decode_tokens_per_s"] / result["plain"]["decode_tokens_per_s"], 2)
    result.update(preset=args.preset, prompt=args.prompt, new=args.new, threads=args.threads or "default",
                  onnxruntime=ort.__version__)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
