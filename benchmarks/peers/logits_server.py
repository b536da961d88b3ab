"""Serves a peer engine's logits at every position of a token window, for quality.py (which runs in the project's
venv and computes every figure with spj_edge's own functions). Runs in the peer's venv:

    .venv-llama/bin/python logits_server.py llama MODEL.gguf      (or: .venv-genai/bin/python ... genai MODEL_DIR)

Protocol, one window at a time: a line of JSON token ids on stdin → on stdout two int32 (rows, vocab), then
rows × vocab float32 logits, where row t predicts the token after ids[t]. The ids are fed as they are: no BOS is
added (the windows carry whatever the model's own framing put in them), and nothing is cached between windows.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

import numpy as np

Logits = Callable[[list[int]], np.ndarray]


def llama(model: str) -> Logits:
    from worker import load_llama

    # logits_all: keep every position's logits, not only the last (what perplexity needs). One thread: on a shared
    # machine llama.cpp's OpenMP threads wait on each other (run.py's 2-thread rows), and speed is not measured here.
    lm = load_llama(model, 1, n_ctx=512, n_batch=512, logits_all=True)

    def logits(ids: list[int]) -> np.ndarray:
        lm.reset()
        lm.eval(ids)
        return np.asarray(lm.scores[:len(ids)], np.float32)
    return logits


def genai(model: str) -> Logits:
    import onnxruntime_genai as og

    lm = og.Model(model)

    def logits(ids: list[int]) -> np.ndarray:
        params = og.GeneratorParams(lm)
        params.set_search_options(max_length=len(ids) + 1)
        generator = og.Generator(lm, params)
        generator.append_tokens(ids)  # one forward pass over the window; the graph's logits cover every position
        out = np.asarray(generator.get_output("logits"), np.float32)[0]
        if out.shape[0] != len(ids):
            sys.exit(f"logits_server.py: {model} gives logits for {out.shape[0]} of {len(ids)} positions")
        return out
    return logits


def main():
    engine, model = sys.argv[1], sys.argv[2]
    logits = {"llama": llama, "genai": genai}[engine](model)
    out = sys.stdout.buffer
    for line in sys.stdin:
        values = logits(json.loads(line))
        out.write(np.array(values.shape, np.int32).tobytes())
        out.write(np.ascontiguousarray(values).tobytes())
        out.flush()


if __name__ == "__main__":
    main()
