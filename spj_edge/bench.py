"""`spj-edge bench`: decode speed, prompt time, peak memory and size of several models, side by side, and how close
each comes to the speed that this machine's memory bandwidth allows.

    bench(["runs/onnx", "dist/student-int8.spj"], ["runs/student"], json_out="bench.json", chart="bench.png")

Each model runs in its own worker process (spawned, so an ONNX or package worker never imports torch and its peak RSS
is the model's own), loaded once and warmed up once. The parent then asks the workers for one repetition each in turn,
round-robin, so that a slow moment of the machine hits every model rather than one. A repetition is a fresh prompt of
`prompt_tokens` random ids (seeded: every model gets the same ids in the same repetition) and `new_tokens` greedy new
tokens, EOS ignored, batch 1. Each kind is timed the way it runs:
  - a package (a directory with spj.json, or its .tar.gz) through spj_edge.runtime, what the device runs
    (spj_edge.runtime.speed: prompt ms = the request to the first new token, tokens/s = the steps after it);
  - an ONNX export directory (model.onnx + config.json) through the plain numpy loop of spj_edge.onnx_lm;
  - a PyTorch checkpoint (`torch_checkpoints`) through the KV-cached loop of spj_edge.generate, timed as a package.

The roofline. A decode step at batch 1 computes little per weight: each weight is read once and used for one
multiply-add, so the step cannot finish before the bytes it needs have come in from memory:

    bytes per token = weights + KV cache
      weights  = every initializer of the graph at its stored dtype (an int8 weight counts 1 byte, its scales their
                 own), except a table only a Gather reads (the token embedding, and an int8 embedding's row scales),
                 of which one row a token is read; a tied LM head is a separate initializer and counts in full
      KV cache = 2 (key, value) × layers × kv_heads × head_dim × 4 bytes (float32) × the mean number of positions a
                 step attends to over the run, prompt_tokens + new_tokens / 2
    bound (tokens/s) = memory bandwidth / bytes per token;   share = measured decode tokens/s / bound

The bandwidth is measured here: a STREAM-like copy between numpy arrays far larger than the last-level cache, split
across the benchmark's threads (numpy's copy releases the GIL), best of a few, counting bytes read plus bytes written as
STREAM does. It is an upper bound on decode speed because it assumes the step does nothing but stream its bytes at the
best rate this machine reaches, with no compute, no kernel launch, no sampling and no Python overhead; the share says
how much of that ceiling is reached. A model small enough to stay in the cache between steps (the `nano` test model)
reads from cache, not memory, so its share can in principle pass 1; for the presets worth benchmarking it cannot.
For a PyTorch checkpoint the weights are its parameters in float32 (how spj_edge.checkpoint loads them), with the same
rule for the embedding and the tied head.
"""
from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np

from .errors import SPJError

SEED = 0
WARMUP = (8, 4)  # prompt ids and new tokens of each worker's untimed first run: allocations, kernel selection
# onnxruntime's (and OpenMP's) pool threads spin for a while after a run; let one worker's go quiet before the next
# is timed, or they take its cores (benchmarks/runtime_speed.py measured a 1-thread prompt at 41 ms instead of 26).
SETTLE_S = 0.2
EXPECTED = ("an ONNX export directory (model.onnx + config.json) or a package (a directory with spj.json, "
            "or its .tar.gz)")


@dataclass
class Model:
    """What the parent knows of a model before any worker starts."""
    name: str
    path: Path
    kind: str  # "onnx", "package" or "torch"
    config: dict  # Hugging Face config keys: plain data, so that a worker can take it without importing torch
    context: int
    file_bytes: int
    parameters: int
    weight_bytes_per_token: int
    kv_bytes_per_position: int


def bench(models: list[str | Path], torch_checkpoints: list[str | Path] = (), *, prompt_tokens: int = 32,
          new_tokens: int = 128, repetitions: int = 5, threads: int | None = None,
          json_out: str | Path | None = None, chart: str | Path | None = None, labels: dict[str, str] | None = None,
          quality: dict[str, float] | None = None) -> dict:
    """Time each model (see the module's docstring); print a table, write `json_out` and the PNG `chart` if given,
    and return the figures. `labels` maps a path as given to its row name; `quality` maps a row name to bits per
    byte (from `spj-edge eval`), shown as the points' colour."""
    from .outputs import write_json
    from .runtime.generator import default_threads

    checks = ((repetitions >= 1, f"repetitions must be ≥ 1, got {repetitions}"),
              (prompt_tokens >= 1, f"prompt_tokens must be ≥ 1, got {prompt_tokens}"),
              (new_tokens >= 2, f"new_tokens must be ≥ 2 (decode speed is timed between new tokens), "
                                f"got {new_tokens}"),
              (threads is None or threads >= 1, f"threads must be ≥ 1, got {threads}"))
    for ok, message in checks:
        if not ok:
            raise SPJError(message)
    threads = default_threads() if threads is None else threads
    labels = {str(path): name for path, name in (labels or {}).items()}
    given = [(p, False) for p in models] + [(p, True) for p in torch_checkpoints]
    if not given:
        raise SPJError("nothing to benchmark: give at least one model (--model) or checkpoint (--torch)")
    specs = [inspect_model(Path(p), labels.get(str(p), str(p)), is_torch) for p, is_torch in given]
    names = [m.name for m in specs]
    if len(set(names)) < len(names):
        raise SPJError(f"two models are named {next(n for n in names if names.count(n) > 1)}: give each its own label")
    unknown = set(quality or {}) - set(names)
    if unknown:
        raise SPJError(f"quality names models that are not benchmarked: {sorted(unknown)} (models: {names})")
    for m in specs:
        if prompt_tokens + new_tokens > m.context:
            raise SPJError(f"{m.path}: a {prompt_tokens}-token prompt and {new_tokens} new tokens exceed the model's "
                           f"context of {m.context} tokens")

    workers = [Worker(m, threads, prompt_tokens, new_tokens) for m in specs]
    try:
        for w in workers:  # they load and warm up at the same time; nothing is timed yet
            w.receive()
        bandwidth = memory_bandwidth_gb_s(threads)  # while the workers wait, idle
        runs = {w.model.name: [] for w in workers}
        for repetition in range(repetitions):
            for w in workers:
                if threads > 1:
                    time.sleep(SETTLE_S)
                runs[w.model.name].append(w.ask(SEED + 1 + repetition))
        finals = {w.model.name: w.ask(None) for w in workers}
    finally:
        for w in workers:
            w.close()

    rows = {}
    mean_positions = prompt_tokens + new_tokens / 2
    for m in specs:
        prompt_ms, rates = zip(*runs[m.name])
        kv_bytes = m.kv_bytes_per_position * mean_positions
        bytes_per_token = m.weight_bytes_per_token + kv_bytes
        bound = bandwidth * 1e9 / bytes_per_token
        rows[m.name] = {
            "path": str(m.path), "kind": m.kind, "file_bytes": m.file_bytes, "parameters": m.parameters,
            "threads": threads,
            "decode_tokens_per_s": statistics.median(rates), "decode_min_max": [min(rates), max(rates)],
            "prompt_ms": statistics.median(prompt_ms), "prompt_min_max": [min(prompt_ms), max(prompt_ms)],
            "decode_runs": list(rates), "prompt_ms_runs": list(prompt_ms),
            **finals[m.name],  # peak_rss_bytes, torch_imported
            "weight_bytes_per_token": m.weight_bytes_per_token, "kv_bytes_per_token": kv_bytes,
            "bytes_per_token": bytes_per_token, "roofline_tokens_per_s": bound,
            "roofline_share": statistics.median(rates) / bound,
            **({"bits_per_byte": quality[m.name]} if quality and m.name in quality else {})}
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
                          "bandwidth_gb_s": bandwidth, "platform": platform.platform()},
              "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repetitions": repetitions,
                           "seed": SEED, "warmup": dict(zip(("prompt_tokens", "new_tokens"), WARMUP)),
                           "kv_mean_positions": mean_positions},
              "models": rows}
    print_result(result)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(json_out, result)
    if chart:
        draw_chart(result, Path(chart))
    return result


# --- what each model is, read in the parent ------------------------------------------------------------------------
def inspect_model(path: Path, name: str, is_torch: bool) -> Model:
    """The model's shape, file size and bytes read per token, with every check that can fail before a worker starts."""
    from .evaluate import model_kind
    from .model import SPJConfig
    from .outputs import parse_onnx, read_json, read_onnx
    from .runtime import read_package

    kind = model_kind(path)
    if is_torch and kind != "torch":
        raise SPJError(f"{path}: not a PyTorch checkpoint (expected a directory with config.json and "
                       "model.safetensors)")
    if not is_torch and kind not in ("onnx", "package"):
        hint = ": a PyTorch checkpoint, give it with --torch" if kind == "torch" else ""
        raise SPJError(f"{path}: not a model to benchmark{hint} (expected {EXPECTED})")

    if kind == "torch":
        config, source, proto = read_json(path / "config.json"), path / "config.json", None
        file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    elif kind == "package":
        package = read_package(path)  # verifies the hashes: a damaged package fails here, not in a worker
        config, source = package.config, f"{path}: spj.json"
        proto = parse_onnx(package.files["model.onnx"], f"{path}: model.onnx")
        file_bytes = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir()
                                                                       if f.is_file())
    else:
        if not (path / "config.json").is_file():
            raise SPJError(f"{path}: no config.json beside model.onnx (expected {EXPECTED})")
        config, source = read_json(path / "config.json"), path / "config.json"
        _, proto = read_onnx(path)
        file_bytes = (path / "model.onnx").stat().st_size
    cfg = SPJConfig.from_hf_dict(config, source=str(source))
    if proto is None:  # float32 parameters: the embedding table is read one row a token, a tied head in full
        h = cfg.hidden_size
        weights = 4 * (cfg.num_parameters() - cfg.vocab_size * h + h + (cfg.vocab_size * h if cfg.tie_word_embeddings
                                                                         else 0))
    else:
        weights = weight_bytes_per_token(proto.graph)
    return Model(name, path, kind, {**config, "head_dim": cfg.head_dim}, cfg.max_position_embeddings, file_bytes,
                 cfg.num_parameters(), weights, 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4)


def weight_bytes_per_token(graph) -> int:
    """Bytes of initializers one decode step reads: each at its stored dtype, but of a table that only Gathers read
    (the token embedding, an int8 embedding's row scales) one row."""
    from onnx import helper

    readers: dict[str, set] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, i))
    total = 0
    for t in graph.initializer:
        nbytes = math.prod(t.dims) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if t.dims and readers.get(t.name) == {("Gather", 0)}:
            nbytes //= t.dims[0]
        total += nbytes
    return total


# --- the workers ---------------------------------------------------------------------------------------------------
class Worker:
    """One model in its own process, answering one request at a time over a pipe."""

    def __init__(self, model: Model, threads: int, prompt_tokens: int, new_tokens: int):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: none of the parent's imports
        self.model = model
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, name=f"bench {model.name}", daemon=True,
                                       args=(child, model.kind, str(model.path), model.config, threads,
                                             prompt_tokens, new_tokens))
        with main_module_hidden():
            self.process.start()
        child.close()  # the child holds its own end: if it dies, recv() here sees the pipe close

    def ask(self, request):
        try:
            self.conn.send(request)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it died: receive() says how
        return self.receive()

    def receive(self):
        try:
            status, value = self.conn.recv()
        except (EOFError, ConnectionResetError):
            self.process.join(5)
            raise SPJError(f"{self.model.name}: its benchmark worker died (exit code {self.process.exitcode})"
                           ) from None
        if status == "error":
            raise SPJError(f"{self.model.name}: {value}")
        return value

    def close(self):
        self.conn.close()
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


@contextlib.contextmanager
def main_module_hidden():
    """Start a spawned process without the calling script: spawn makes the child import the parent's `__main__`
    again (for objects pickled from it; a worker is sent none), so a script that imports torch at its top would put
    torch, and its memory, into every worker's peak RSS."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = ModuleType("__main__")  # no __spec__, no __file__: nothing for the child to import
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def serve(conn, kind: str, path: str, config: dict, threads: int, prompt_tokens: int, new_tokens: int):
    """The worker: load, warm up, say "ready"; then per request (a seed) one timed generation, until None, when it
    reports its peak memory."""
    try:
        run = load_runner(kind, path, config, threads)
        run(*WARMUP, np.random.default_rng(SEED))
        conn.send(("ready", None))
        while (seed := conn.recv()) is not None:
            conn.send(("run", run(prompt_tokens, new_tokens, np.random.default_rng(seed))))
        conn.send(("done", {"peak_rss_bytes": peak_rss_bytes(), "torch_imported": "torch" in sys.modules}))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent stopped (a model failed, ^C): quietly
        return
    except Exception as e:  # to the parent, which names the model
        try:
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
        except (BrokenPipeError, OSError):
            pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory: /proc's VmHWM, the high-water mark of its own address space. Not
    getrusage's ru_maxrss on Linux: that keeps the peak of the address space replaced at exec, i.e. the parent's RSS at
    fork (a spawned worker of a parent holding 400 MB reported 418 MB there, VmHWM 28 MB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:  # no /proc: macOS, where ru_maxrss is in bytes and has no such carry-over
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_runner(kind: str, path: str, config: dict, threads: int):
    """A function (prompt length, new tokens, rng) → (prompt ms, decode tokens/s) for one greedy generation from a
    prompt of random ids. Imports only what its kind needs."""
    from .runtime.speed import Timing, measure

    if kind == "onnx":
        from .onnx_lm import OnnxLM

        return OnnxLM(Path(path) / "model.onnx", SimpleNamespace(**config), threads).decode_rate
    if kind == "package":
        from .runtime import Generator

        generator = Generator.load(path, threads)

        def run(prompt_len, new, rng):
            timing = measure(generator, rng.integers(3, generator.vocab_limit, prompt_len).tolist(), new)
            return timing.prompt_ms, timing.tokens_per_s
        return run

    import torch

    from .checkpoint import load_model
    from .generate import generate_ids
    from .sampling import Sampler, SamplingParams

    torch.set_num_threads(threads)
    model = load_model(path)
    vocab = model.config.vocab_size

    def run(prompt_len, new, rng):
        timing = Timing(prompt_len)
        for _ in timing.track(generate_ids(model, rng.integers(3, vocab, prompt_len).tolist(), new,
                                           Sampler(SamplingParams(temperature=0.0), vocab), None)):
            pass
        return timing.prompt_ms, timing.tokens_per_s
    return run


# --- the machine ---------------------------------------------------------------------------------------------------
def memory_bandwidth_gb_s(threads: int, trials: int = 3) -> float:
    """STREAM's copy: bytes read plus bytes written per second, between arrays far larger than the last-level cache,
    each of `threads` threads copying its slice; best of `trials` after one pass that faults the pages in."""
    n = min(max(4 * last_level_cache_bytes(), 256 << 20), 1 << 30) // 8
    src, dst = np.ones(n), np.empty(n)
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def copy(i):
        np.copyto(dst[bounds[i]:bounds[i + 1]], src[bounds[i]:bounds[i + 1]])

    best = math.inf
    with ThreadPoolExecutor(threads) as pool:
        for trial in range(trials + 1):
            start = time.perf_counter()
            list(pool.map(copy, range(threads)))
            if trial:
                best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- output --------------------------------------------------------------------------------------------------------
def print_result(result: dict) -> None:
    from .outputs import print_table

    machine, settings = result["machine"], result["settings"]
    with_quality = any("bits_per_byte" in r for r in result["models"].values())
    rows = []
    for name, r in result["models"].items():
        (dlo, dhi), (plo, phi) = r["decode_min_max"], r["prompt_min_max"]
        rows.append((name, f"{r['file_bytes'] / 1e6:.2f}", f"{r['parameters'] / 1e6:.2f}M",
                     f"{r['decode_tokens_per_s']:.1f} ({dlo:.1f}–{dhi:.1f})", f"{r['prompt_ms']:.1f} ({plo:.1f}–{phi:.1f})",
                     f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['roofline_tokens_per_s']:.0f}",
                     f"{100 * r['roofline_share']:.1f} %", *((r.get("bits_per_byte"),) if with_quality else ())))
    print_table(f"bench: {settings['prompt_tokens']}-token prompt, {settings['new_tokens']} new tokens, "
                f"{settings['repetitions']} repetitions, {_threads(machine)}; memory bandwidth "
                f"{machine['bandwidth_gb_s']:.1f} GB/s ({machine['cpu']})",
                ["model", "MB", "params", "decode tok/s (min–max)", "prompt ms (min–max)", "peak RSS MB", "bound tok/s",
                 "share", *(("bits/byte",) if with_quality else ())], rows)


def _threads(machine: dict) -> str:
    return f"{machine['threads']} thread{'s' * (machine['threads'] > 1)}"


def draw_chart(result: dict, path: Path) -> None:
    """Decode tokens/s (median, min–max bars) against file size, one labelled point a model; bits per byte as the
    colour when known. Written to a temporary name and renamed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["models"]
    names = list(rows)
    mb = np.array([rows[n]["file_bytes"] / 1e6 for n in names])
    rate = np.array([rows[n]["decode_tokens_per_s"] for n in names])
    low, high = np.array([rows[n]["decode_min_max"] for n in names]).T
    bpb = [rows[n].get("bits_per_byte") for n in names]

    fig = Figure(figsize=(7.5, 4.8), dpi=120)  # no pyplot: no global figure state, no display backend
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.errorbar(mb, rate, yerr=[rate - low, high - rate], fmt="none", ecolor="0.6", capsize=3, zorder=1)
    known = np.array([b is not None for b in bpb])
    if known.any():
        points = ax.scatter(mb[known], rate[known], c=[b for b in bpb if b is not None], cmap="viridis_r", s=60,
                            zorder=2, edgecolors="black", linewidths=0.5)
        fig.colorbar(points, ax=ax, label="bits per byte (lower is better)")
    if (~known).any():
        ax.scatter(mb[~known], rate[~known], color="0.5", s=60, zorder=2, edgecolors="black", linewidths=0.5)
    for i, (name, x, y) in enumerate(zip(names, mb, rate)):  # above and below in turn: neighbours often coincide
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -12), fontsize=8)
    if mb.max() / max(mb.min(), 1e-9) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.25)  # room for the names of the outermost points
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_ylim(bottom=0)
    machine, settings = result["machine"], result["settings"]
    ax.set_title(f"{settings['prompt_tokens']}-token prompt + {settings['new_tokens']} new tokens, "
                 f"{_threads(machine)}, {machine['bandwidth_gb_s']:.1f} GB/s memory", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
