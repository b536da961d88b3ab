"""One measurement of one engine, in a process of its own (run.py starts one per engine, precision, thread count and
repetition, so the peak RSS printed is that engine's alone). Prints one JSON line.

    PYTHON worker.py --engine spj|llama|genai|torch --model PATH --threads N --prompts prompt.json [--new 128]

PYTHON is the venv that has the engine: the project's for spj and torch, .venv-llama, .venv-genai. Every engine is
given the same prompt ids (no tokenizer in the timed path), decodes greedily, ignores EOS, and is timed the same way
as spj_edge.runtime.speed.Timing: prompt time is from the request to the first new token (the prompt's forward pass
and one sampling), decode tokens/s counts the tokens after the first over the time after it. Warm-up first (one short
run per prompt length): the first run of a session allocates its buffers.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

# An engine: (prompt ids, new tokens) -> the new token ids, yielded as each is produced.
Engine = Callable[[list[int], int], Iterator[int]]


def timed(tokens: Iterator[int]) -> dict:
    start, times, ids = time.perf_counter(), [], []
    for token in tokens:
        times.append(time.perf_counter())
        ids.append(int(token))
    return {"prompt_ms": (times[0] - start) * 1000,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None,
            "ids": ids}


def peak_rss_mb() -> float:
    """The process's high-water resident set (VmHWM): loading, both prompts and the decode."""
    try:
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- engines: each loads its model and returns an Engine ------------------------------------------------------------
def spj(model: str, threads: int) -> Engine:
    """Our package through the device runtime, as a user runs it."""
    from spj_edge.runtime import Generator

    generator = Generator.load(model, threads=threads)
    return lambda ids, new: generator.tokens(ids, max_new_tokens=new, temperature=0.0, ignore_eos=True)


def llama_extra_buffers() -> bool:
    """Whether llama.cpp may put weights in its "extra" CPU buffer types: AMX tiles and the repacked x86/ARM layouts
    of Q4_0/Q8_0. On this project's Xeon VMs (AMX advertised) the AMX matmul segfaults (ggml_backend_amx_mul_mat, in
    an OpenMP worker), so `auto` turns them off where the CPU has AMX, which also loses the repacked layouts.
    PEERS_LLAMA_EXTRA_BUFFERS=on|off|auto (run.py --llama-extra-buffers)."""
    import os

    choice = os.environ.get("PEERS_LLAMA_EXTRA_BUFFERS", "auto")
    if choice == "auto":
        try:
            return "amx_int8" not in open("/proc/cpuinfo").read()
        except OSError:
            return True
    return choice == "on"


def load_llama(model: str, threads: int, **options):
    """llama_cpp.Llama with llama_extra_buffers() applied: Llama() builds its model parameters from
    llama_model_default_params, which has no keyword for this, so the defaults are wrapped while it loads."""
    import llama_cpp
    import llama_cpp.llama

    defaults = llama_cpp.llama_model_default_params
    extra = llama_extra_buffers()

    def params():
        p = defaults()
        p.use_extra_bufts = extra
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=model, n_threads=threads, n_threads_batch=threads, verbose=False, **options)
    finally:
        llama_cpp.llama.llama_cpp.llama_model_default_params = defaults


def llama(model: str, threads: int) -> Engine:
    """llama-cpp-python's Llama.generate, greedy (top_k 1). reset() first: generate() would otherwise reuse the KV
    cache of a previous run's common prefix and skip most of the prompt."""
    lm = load_llama(model, threads, n_ctx=512)

    def generate(ids: list[int], new: int) -> Iterator[int]:
        lm.reset()
        for count, token in enumerate(lm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), 1):
            yield token
            if count == new:
                return
    return generate


def genai(model: str, threads: int) -> Engine:
    """onnxruntime-genai's Generator, greedy; min_length keeps it from stopping at EOS."""
    import onnxruntime_genai as og

    config = og.Config(model)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads,
                                                                          "inter_op_num_threads": 1}}}}))
    lm = og.Model(config)

    def generate(ids: list[int], new: int) -> Iterator[int]:
        params = og.GeneratorParams(lm)
        params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
        generator = og.Generator(lm, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
            yield generator.get_next_tokens()[0]
    return generate


def torch_eager(model: str, threads: int) -> Engine:
    """transformers' LlamaForCausalLM (eager attention) and its generate(), float32; a streamer reports the tokens."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager").eval()

    class Tokens(BaseStreamer):
        def __init__(self):
            self.ids, self.prompt_seen, self.done = [], False, threading.Event()

        def put(self, value):
            if self.prompt_seen:  # the first call is the prompt itself
                self.ids.append(int(value.reshape(-1)[0]))
            self.prompt_seen = True

        def end(self):
            self.done.set()

    def generate(ids: list[int], new: int) -> Iterator[int]:
        # generate() runs to the end before returning: the streamer is read from here while it runs in a thread.
        streamer = Tokens()
        worker = threading.Thread(target=lambda: lm.generate(
            torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer,
            pad_token_id=0))
        with torch.inference_mode():
            worker.start()
            seen = 0
            while seen < new:
                if len(streamer.ids) > seen:
                    yield streamer.ids[seen]
                    seen += 1
                elif streamer.done.is_set():
                    break
                else:
                    time.sleep(0.0002)
            worker.join()
    return generate


ENGINES = {"spj": spj, "llama": llama, "genai": genai, "torch": torch_eager}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=ENGINES, required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="prompt.json: {length: ids} (build.py writes it)")
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    prompts = json.loads(args.prompts.read_text())
    short, long = prompts["32"], prompts["128"]
    load_start = time.perf_counter()
    engine = ENGINES[args.engine](args.model, args.threads)
    load_s = time.perf_counter() - load_start
    for ids in (short, long):  # warm-up
        list(engine(ids, 4))
    run = timed(engine(short, args.new))
    long_run = timed(engine(long, 2))
    print(json.dumps({"load_s": load_s, "prompt_ms": run["prompt_ms"],
                      "decode_tokens_per_s": run["decode_tokens_per_s"], "new_tokens": len(run["ids"]),
                      "prompt128_ms": long_run["prompt_ms"], "peak_rss_mb": peak_rss_mb(), "first_ids": run["ids"][:16]}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
