"""Plain vs fused ONNX graphs: node count, file size, export time and decode speed (forward steps, onnx_lm).

    .venv/bin/python benchmarks/onnx_decode.py --preset small --prompt 32 --new 128 --repetitions 5

Random weights (speed does not depend on them). Batch 1; decode tokens/s counts only the single-token steps after the
prompt; repetitions alternate between the graphs and the median is reported. Both graphs are checked against PyTorch
first (the export's own verification), so the speed is of graphs known to be right.
"""
from __future__ import annotations

import argparse
import json
import time

import onnxruntime as ort
import torch

from spj_edge.config import load_preset
from spj_edge.export import export_plain, verify
from spj_edge.model import Transformer
from spj_edge.onnx_fused import build_fused_model
from spj_edge.onnx_lm import measure_speed


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
        graphs[kind] = proto.SerializeToString()
        result[kind] = {"nodes": len(proto.graph.node), "file_mb": round(len(graphs[kind]) / 1e6, 2),
                        "export_s": round(export_s, 2),
                        "max_abs_diff": max(checks["prefill_max_abs_diff"], checks["decode_max_abs_diff"])}
    speed = measure_speed(graphs, model.config, args.prompt, args.new, args.repetitions, args.threads)
    for kind in graphs:
        result[kind].update(speed[kind])
    result["fused_speedup"] = round(speed["fused"]["decode_tokens_per_s"] / speed["plain"]["decode_tokens_per_s"], 2)
    result.update(preset=args.preset, prompt=args.prompt, new=args.new, onnxruntime=ort.__version__)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
