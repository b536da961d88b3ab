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
  - an ONNX export directory (model.onnx, its config in the graph) through spj_edge.onnx_lm: the runtime's step loop,
    each forward step timed alone;
  - a PyTorch checkpoint (`torch_checkpoints`) through the KV-cached loop of spj_edge.generate, timed as a package.

The roofline. A decode step at batch 1 computes little per weight: each weight is read once and used for one
multiply-add, so the step cannot finish before the bytes it needs have come in from memory:

    bytes per token = weights + KV cache
      weights  = every initializer of the graph at its stored dtype (an int8 weight counts 1 byte, its scales their
                 own), except a table only a Gather reads (the token embedding, and an int8 embedding's row scales),
                 of which one row a token is read; a tied LM head is a separate initializer and counts in full
      KV cache = 2 (key, value) × layers × kv_heads × head_dim × 4 bytes (float32) × the mean number of positions a
                 step attends to over the run, prompt_tokens + new_tokens / 2
    bytes from memory = bytes per token − the CPU cache the threads can use (all levels)
    bound (tokens/s) = memory bandwidth / bytes from memory;   share = measured decode tokens/s / bound

Those bytes are what a step must read, not what an implementation moves (onnxruntime copies the past KV cache into
the present one every step, for instance): counting less makes the bound higher, never lower. Of them, at most the
cache's capacity can still be on chip from the previous step, so the rest must come from memory. A model whose bytes
fit in the cache (every demo model on a server CPU, the `nano` test model anywhere) has no memory bound: its share is
not shown, with a warning that says so: a 7 MB fp32 model read from a 32 MB cache is how a share of 101.7 % happens.

The bandwidth is measured here: a STREAM-like copy between numpy arrays far larger than the cache, split across the
benchmark's threads (numpy's copy releases the GIL), best of a few, counting bytes read plus bytes written as STREAM
does (the fastest way numpy reads memory: a reduction or a matrix-vector product reads slower). It runs in a worker
of its own, once in every round of the repetitions, so that it sees the machine the models saw; its median is the
bandwidth of the bound and its spread (min–max) is reported. It is an upper bound on decode speed because it assumes
the step does nothing but stream its bytes at the best rate this machine reaches, with no compute, no kernel launch,
no sampling and no Python overhead; the share says how much of that ceiling is reached. A share is not shown when the
bandwidth or the model's speed varied by more than MAX_SPREAD over the rounds (a busy machine), nor when the
measurement exceeds the bound, which only a wrong measurement can do: each time with a one-line warning.
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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from .config import SPJConfig
from .errors import SPJError
from .options import BenchOptions

SEED = 0
WARMUP = (8, 4)  # prompt ids and new tokens of each worker's untimed first run: allocations, kernel selection
# onnxruntime's (and OpenMP's) pool threads spin for a while after a run; let one worker's go quiet before the next
# is timed, or they take its cores (benchmarks/runtime_speed.py measured a 1-thread prompt at 41 ms instead of 26).
SETTLE_S = 0.2
# The widest spread (max / min over the rounds) of the bandwidth, or of a model's decode speed, under which a share is
# shown. The share tells a model near its ceiling from one that compute or overhead holds at half of it, a factor of
# 2; the median of values that range over more than 1.25× could sit anywhere in that range, and the share moves with
# it by as much (the 16.1–24.0 GB/s, 1.49×, is the difference between 68 % and 101 %).
MAX_SPREAD = 1.25
EXPECTED = ("an ONNX export directory (model.onnx) or a package (a directory with spj.json, "
            "or its .tar.gz)")
KINDS = {"torch": ("o", "PyTorch checkpoint"), "onnx": ("s", "ONNX export (forward steps)"),
         "package": ("D", "package (spj_edge.runtime)")}  # marker and legend entry of each kind on the chart


@dataclass
class Model:
    """What the parent knows of a model before any worker starts."""
    name: str
    path: Path
    kind: str  # "onnx", "package" or "torch"
    config: SPJConfig  # torch-free: a worker takes it without importing torch
    context: int
    file_bytes: int
    parameters: int
    weight_bytes_per_token: int
    kv_bytes_per_position: int


def bench(models: list[str | Path], torch_checkpoints: list[str | Path] = (), *,
          options: BenchOptions = BenchOptions(), json_out: str | Path | None = None, chart: str | Path | None = None,
          labels: dict[str, str] | None = None, quality: dict[str, float] | None = None) -> dict:
    """Time each model (see the module's docstring); print a table, write `json_out` and the PNG `chart` if given,
    and return the figures. `labels` maps a path as given to its row name; `quality` maps a row name to bits per
    byte (from `spj-edge eval`), shown as the points' colour."""
    from .outputs import write_json
    from .runtime.generator import default_threads

    prompt_tokens, new_tokens, repetitions = options.prompt_tokens, options.new_tokens, options.repetitions
    threads = default_threads() if options.threads is None else options.threads
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

    bandwidths, runs, finals = measure_round_robin(specs, threads, prompt_tokens, new_tokens, repetitions)
    cache = cache_bytes(threads)
    mean_positions = prompt_tokens + new_tokens / 2
    rows = {}
    for m in specs:
        prompt_ms, rates = zip(*runs[m.name])
        kv_bytes = m.kv_bytes_per_position * mean_positions
        bytes_per_token = m.weight_bytes_per_token + kv_bytes
        rows[m.name] = {
            "path": str(m.path), "kind": m.kind, "file_bytes": m.file_bytes, "parameters": m.parameters,
            "threads": threads,
            "decode_tokens_per_s": statistics.median(rates), "decode_min_max": [min(rates), max(rates)],
            "prompt_ms": statistics.median(prompt_ms), "prompt_min_max": [min(prompt_ms), max(prompt_ms)],
            "decode_runs": list(rates), "prompt_ms_runs": list(prompt_ms),
            **finals[m.name],  # peak_rss_bytes, torch_imported
            "weight_bytes_per_token": m.weight_bytes_per_token, "kv_bytes_per_token": kv_bytes,
            "bytes_per_token": bytes_per_token,
            **roofline(m.name, bytes_per_token, cache, bandwidths, rates),
            **({"bits_per_byte": quality[m.name]} if quality and m.name in quality else {})}
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads,
                          "bandwidth_gb_s": statistics.median(bandwidths),
                          "bandwidth_min_max": [min(bandwidths), max(bandwidths)], "bandwidth_runs": bandwidths,
                          "cache_bytes": cache, "platform": platform.platform()},
              "settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repetitions": repetitions,
                           "seed": SEED, "warmup": dict(zip(("prompt_tokens", "new_tokens"), WARMUP)),
                           "kv_mean_positions": mean_positions, "max_spread": MAX_SPREAD},
              "models": rows}
    print_result(result)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(json_out, result)
    if chart:
        draw_chart(result, Path(chart))
    return result


def measure_round_robin(specs: list[Model], threads: int, prompt_tokens: int, new_tokens: int, repetitions: int):
    """The memory bandwidth of each round (GB/s), each model's (prompt ms, decode tokens/s) of each round, and each
    model's worker's final report, all from spawned workers that are loaded before anything is timed."""
    probe = Worker("memory bandwidth", BandwidthProbe, (threads,))
    workers = [Worker(m.name, model_runner, (m.kind, str(m.path), m.config, threads, prompt_tokens, new_tokens))
               for m in specs]
    try:
        for w in (probe, *workers):  # they load and warm up at the same time; nothing is timed yet
            w.receive()
        bandwidths, runs = [], {w.name: [] for w in workers}
        for repetition in range(repetitions):
            bandwidths.append(probe.ask((), settle=threads > 1))
            for w in workers:
                runs[w.name].append(w.ask((SEED + 1 + repetition,), settle=threads > 1))
        finals = {w.name: w.ask(None) for w in workers}
    finally:
        for w in (probe, *workers):
            w.close()
    return bandwidths, runs, finals


def roofline(name: str, bytes_per_token: float, cache: int, bandwidths: list[float], rates: list[float]) -> dict:
    """The bound and the share of a model's row, or no share and the one-line warning that says why not."""
    memory_bytes = max(bytes_per_token - cache, 0)
    bound = statistics.median(bandwidths) * 1e9 / memory_bytes if memory_bytes else None
    share = statistics.median(rates) / bound if bound else None
    if bound is None:
        warning = (f"{name}: its {bytes_per_token / 1e6:.2f} MB a token fit in the {cache / 1e6:.0f} MB of CPU cache "
                   "its threads can use: memory bandwidth does not bound it, so no share is shown")
    elif spread(bandwidths) > MAX_SPREAD:
        warning = (f"the memory bandwidth varied from {min(bandwidths):.1f} to {max(bandwidths):.1f} GB/s over the "
                   f"rounds (more than {MAX_SPREAD}×: a busy machine), so no share is shown")
    elif spread(rates) > MAX_SPREAD:
        warning = (f"{name}: its decode speed varied from {min(rates):.1f} to {max(rates):.1f} tokens/s over the "
                   f"rounds (more than {MAX_SPREAD}×: a busy machine), so no share is shown")
    elif share > 1:
        warning = (f"{name}: measured at {share:.0%} of what memory allows, which a right measurement cannot be, "
                   "so no share is shown")
    else:
        warning = None
    return {"memory_bytes_per_token": memory_bytes, "roofline_tokens_per_s": bound,
            "roofline_share": None if warning else share, "roofline_warning": warning}


def spread(values: list[float]) -> float:
    """max / min: 1 for values that agree."""
    return max(values) / min(values)


# --- what each model is, read in the parent ------------------------------------------------------------------------
def inspect_model(path: Path, name: str, is_torch: bool) -> Model:
    """The model's shape, file size and bytes read per token, with every check that can fail before a worker starts
    (a package's hashes, a graph that does not parse)."""
    from .artifact import artifact_kind, open_artifact

    kind = artifact_kind(path)
    if is_torch and kind != "torch":
        raise SPJError(f"{path}: not a PyTorch checkpoint (expected a directory with config.json and "
                       "model.safetensors)")
    if not is_torch and kind not in ("onnx", "package"):
        hint = ": a PyTorch checkpoint, give it with --torch" if kind == "torch" else ""
        raise SPJError(f"{path}: not a model to benchmark{hint} (expected {EXPECTED})")
    artifact = open_artifact(path)
    cfg = artifact.config
    if kind == "torch":  # float32 parameters: the embedding table is read one row a token, a tied head in full
        h = cfg.hidden_size
        weights = 4 * (cfg.num_parameters() - cfg.vocab_size * h + h + (cfg.vocab_size * h if cfg.tie_word_embeddings
                                                                         else 0))
    else:
        weights = weight_bytes_per_token(artifact.proto.graph)
    return Model(name, path, kind, cfg, cfg.max_position_embeddings, artifact.file_bytes,
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
    """`factory(*args)` in its own process, whose result is then called once a request (a tuple of its arguments) over
    a pipe: a model's generation, or a bandwidth measurement."""

    def __init__(self, name: str, factory, args: tuple):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: none of the parent's imports
        self.name = name
        self.conn, child = context.Pipe()
        self.process = context.Process(target=serve, name=f"bench {name}", daemon=True, args=(child, factory, args))
        with main_module_hidden():
            self.process.start()
        child.close()  # the child holds its own end: if it dies, recv() here sees the pipe close

    def ask(self, request: tuple | None, settle: bool = False):
        if settle:
            time.sleep(SETTLE_S)
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
            raise SPJError(f"{self.name}: its benchmark worker died (exit code {self.process.exitcode})") from None
        if status == "error":
            raise SPJError(f"{self.name}: {value}")
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


def serve(conn, factory, args: tuple):
    """The worker: build what it runs (loaded and warmed up), say "ready"; then per request one run, until None, when
    it reports its peak memory."""
    try:
        run = factory(*args)
        conn.send(("ready", None))
        while (request := conn.recv()) is not None:
            conn.send(("run", run(*request)))
        conn.send(("done", {"peak_rss_bytes": peak_rss_bytes(), "torch_imported": "torch" in sys.modules}))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent stopped (a model failed, ^C): quietly
        return
    except Exception as e:  # to the parent, which names the model
        try:
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
        except (BrokenPipeError, OSError):
            pass


def model_runner(kind: str, path: str, config: SPJConfig, threads: int, prompt_tokens: int, new_tokens: int):
    """A model loaded and warmed up, as a function seed → (prompt ms, decode tokens/s) of one timed generation."""
    run = load_runner(kind, path, config, threads)
    run(*WARMUP, np.random.default_rng(SEED))
    return lambda seed: run(prompt_tokens, new_tokens, np.random.default_rng(seed))


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


def load_runner(kind: str, path: str, config: SPJConfig, threads: int):
    """A function (prompt length, new tokens, rng) → (prompt ms, decode tokens/s) for one greedy generation from a
    prompt of random ids. Imports only what its kind needs."""
    from .runtime.speed import Timing, measure

    if kind == "onnx":
        from .onnx_lm import OnnxLM

        return OnnxLM(Path(path) / "model.onnx", config, threads).decode_rate
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
class BandwidthProbe:
    """STREAM's copy: bytes read plus bytes written per second, between arrays far larger than the CPU cache, each of
    `threads` threads copying its slice. The arrays are made and their pages faulted in once; each call is the best
    of `trials` copies, a ceiling for the moment it runs in."""

    def __init__(self, threads: int, trials: int = 3):
        n = min(max(4 * cache_bytes(threads), 256 << 20), 1 << 30) // 8
        self.src, self.dst = np.ones(n), np.empty(n)
        self.threads, self.trials = threads, trials
        self.bounds = np.linspace(0, n, threads + 1).astype(int)
        self()  # the first copy faults dst's pages in

    def __call__(self) -> float:
        def copy(i):
            np.copyto(self.dst[self.bounds[i]:self.bounds[i + 1]], self.src[self.bounds[i]:self.bounds[i + 1]])

        best = math.inf
        with ThreadPoolExecutor(self.threads) as pool:
            for _ in range(self.trials):
                start = time.perf_counter()
                list(pool.map(copy, range(self.threads)))
                best = min(best, time.perf_counter() - start)
        return 2 * self.src.nbytes / best / 1e9


def memory_bandwidth_gb_s(threads: int, trials: int = 3) -> float:
    """One measurement of BandwidthProbe, in this process."""
    return BandwidthProbe(threads, trials)()


def cache_bytes(threads: int, default: int = 32 << 20) -> int:
    """The CPU cache, all levels together, that `threads` threads can use: of each level, the `threads` largest of its
    instances among the CPUs this process may run on (a private cache is one instance a core, a shared one is one
    instance for the cores that share it; a thread sits under one instance of each level). `default` where the system
    does not say (no /sys)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    instances: dict[tuple[str, str, str], int] = {}  # (level, type, the CPUs sharing it) → bytes
    for cpu in cpus:
        for index in Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*"):
            try:
                level, kind, shared, size = ((index / f).read_text().strip()
                                             for f in ("level", "type", "shared_cpu_list", "size"))
            except OSError:
                continue
            if kind != "Instruction" and size.rstrip("KMG").isdigit():
                instances[level, kind, shared] = int(size.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20,
                                                                             "G": 1 << 30}.get(size[-1], 1)
    by_level: dict[tuple[str, str], list[int]] = {}
    for (level, kind, _), size in instances.items():
        by_level.setdefault((level, kind), []).append(size)
    return sum(sum(sorted(sizes, reverse=True)[:threads]) for sizes in by_level.values()) or default


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
    """The table on stderr, then each reason a share is not shown, once."""
    from .tables import print_table

    machine, settings = result["machine"], result["settings"]
    with_quality = any("bits_per_byte" in r for r in result["models"].values())
    rows = []
    for name, r in result["models"].items():
        (dlo, dhi), (plo, phi) = r["decode_min_max"], r["prompt_min_max"]
        bound, share = r["roofline_tokens_per_s"], r["roofline_share"]
        rows.append((name, f"{r['file_bytes'] / 1e6:.2f}", f"{r['parameters'] / 1e6:.2f}M",
                     f"{r['decode_tokens_per_s']:.1f} ({dlo:.1f}–{dhi:.1f})", f"{r['prompt_ms']:.1f} ({plo:.1f}–{phi:.1f})",
                     f"{r['peak_rss_bytes'] / 1e6:.0f}", "-" if bound is None else f"{bound:.0f}",
                     "-" if share is None else f"{100 * share:.1f} %",
                     *((r.get("bits_per_byte"),) if with_quality else ())))
    print_table(f"bench: {settings['prompt_tokens']}-token prompt, {settings['new_tokens']} new tokens, "
                f"{settings['repetitions']} repetitions, {_threads(machine)}; {_bandwidth(machine)} "
                f"({machine['cpu']}, {machine['cache_bytes'] / 1e6:.0f} MB of cache for the threads)",
                ["model", "MB", "params", "decode tok/s (min–max)", "prompt ms (min–max)", "peak RSS MB", "bound tok/s",
                 "share", *(("bits/byte",) if with_quality else ())], rows)
    for warning in dict.fromkeys(r["roofline_warning"] for r in result["models"].values() if r["roofline_warning"]):
        print(f"spj-edge: warning: {warning}", file=sys.stderr)


def _threads(machine: dict) -> str:
    return f"{machine['threads']} thread{'s' * (machine['threads'] > 1)}"


def _bandwidth(machine: dict) -> str:
    low, high = machine["bandwidth_min_max"]
    return f"memory bandwidth {machine['bandwidth_gb_s']:.1f} GB/s ({low:.1f}–{high:.1f})"


def draw_chart(result: dict, path: Path) -> None:
    """chart_figure, written to a temporary name and renamed."""
    fig = chart_figure(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def chart_figure(result: dict):
    """Decode tokens/s (median, min–max bars) against file size, one labelled point a model, one marker a kind of
    model; bits per byte as the colour when known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = result["models"]
    names = list(rows)
    mb = np.array([rows[n]["file_bytes"] / 1e6 for n in names])
    rate = np.array([rows[n]["decode_tokens_per_s"] for n in names])
    low, high = np.array([rows[n]["decode_min_max"] for n in names]).T
    bpb = np.array([rows[n].get("bits_per_byte", np.nan) for n in names], dtype=float)
    kinds = np.array([rows[n]["kind"] for n in names])

    fig = Figure(figsize=(7.5, 4.8), dpi=120)  # no pyplot: no global figure state, no display backend
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.errorbar(mb, rate, yerr=[rate - low, high - rate], fmt="none", ecolor="0.6", capsize=3, zorder=1)
    known = ~np.isnan(bpb)
    colours = ScalarMappable(Normalize(*(bpb[known].min(), bpb[known].max()) if known.any() else (0, 1)),
                             "viridis_r")
    for kind, (marker, _) in KINDS.items():
        for with_bpb in (True, False):
            chosen = (kinds == kind) & (known == with_bpb)
            if chosen.any():
                ax.scatter(mb[chosen], rate[chosen], marker=marker, s=60, zorder=2, edgecolors="black", linewidths=0.5,
                           gid=kind, **(dict(c=bpb[chosen], cmap=colours.cmap, norm=colours.norm) if with_bpb
                                        else dict(color="0.5")))
    if known.any():
        fig.colorbar(colours, ax=ax, label="bits per byte (lower is better)")
    # below the axes, where it can cover neither a point nor a name
    fig.legend(handles=[Line2D([], [], marker=marker, linestyle="", color="0.5", markeredgecolor="black", label=label)
                        for kind, (marker, label) in KINDS.items() if kind in kinds],
               loc="lower center", ncols=len(KINDS), fontsize=8, frameon=False)
    if mb.max() / max(mb.min(), 1e-9) > 10:
        ax.set_xscale("log")
    ax.margins(x=0.25, y=0.15)  # room for the names of the outermost points
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_ylim(bottom=0)
    machine, settings = result["machine"], result["settings"]
    ax.set_title(f"{settings['prompt_tokens']}-token prompt + {settings['new_tokens']} new tokens, "
                 f"{_threads(machine)}, {_bandwidth(machine)}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))  # the legend's row
    label_points(ax, names, mb, rate)
    return fig


def label_points(ax, names: list[str], x: np.ndarray, y: np.ndarray, fontsize: float = 8) -> None:
    """Each name beside its point, at its height: to the right, or to the left where another point would be nearer
    to it on the right. A name that would overlap another moves up or down just enough, keeping the names in their
    points' vertical order; a name that has moved, or that still has another point nearer, is joined to its point by
    a line. (Names put above and below in turn by their order in the table swapped two of them whenever the second
    point was the higher one.)"""
    from matplotlib.font_manager import FontProperties

    ax.autoscale_view()  # the pending autoscaling, now: the names are placed by where the points will be drawn
    px = ax.transData.transform(np.column_stack([x, y]))
    renderer = ax.figure.canvas.get_renderer()
    font = FontProperties(size=fontsize)
    size = np.array([renderer.get_text_width_height_descent(name, font, ismath=False)[:2] for name in names])
    pixels_per_point = ax.figure.dpi / 72
    pad, gap = 6 * pixels_per_point, 1.3 * size[:, 1].max()  # name to point; one name's height to the next's

    def box(i, side, height):  # x0, x1, y0, y1 of name i, in pixels
        x0 = px[i, 0] + pad if side > 0 else px[i, 0] - pad - size[i, 0]
        return x0, x0 + size[i, 0], height - size[i, 1] / 2, height + size[i, 1] / 2

    def nearest(i, side, height):  # the point nearest to name i's box
        x0, x1, y0, y1 = box(i, side, height)
        dx = np.maximum(np.maximum(x0 - px[:, 0], px[:, 0] - x1), 0)
        dy = np.maximum(np.maximum(y0 - px[:, 1], px[:, 1] - y1), 0)
        return int(np.argmin(np.hypot(dx, dy)))

    sides = [1 if nearest(i, 1, px[i, 1]) == i or nearest(i, -1, px[i, 1]) != i else -1 for i in range(len(names))]

    def collide(i, j):  # their names' horizontal extents overlap
        (a0, a1, *_), (b0, b1, *_) = box(i, sides[i], 0), box(j, sides[j], 0)
        return a0 < b1 + pad and b0 < a1 + pad

    order = sorted(range(len(names)), key=lambda i: px[i, 1])
    at = px[:, 1].copy()
    for k, i in enumerate(order):  # upwards from the lowest: each above the names below it that it would touch
        at[i] = max([at[i], *(at[j] + gap for j in order[:k] if collide(i, j))])
    top = ax.bbox.ymax - gap / 2
    for k, i in reversed(list(enumerate(order))):  # then down from the top, for those pushed out of the axes
        at[i] = min([at[i], top, *(at[j] - gap for j in order[k + 1:] if collide(i, j))])
    for i, name in enumerate(names):
        joined = abs(at[i] - px[i, 1]) > 0.5 or nearest(i, sides[i], at[i]) != i
        ax.annotate(name, (x[i], y[i]), textcoords="offset points",
                    xytext=(6 * sides[i], (at[i] - px[i, 1]) / pixels_per_point),
                    ha="left" if sides[i] > 0 else "right", va="center", fontsize=fontsize, annotation_clip=False,
                    arrowprops=dict(arrowstyle="-", color="0.4", lw=0.6, shrinkA=1, shrinkB=4) if joined else None)
