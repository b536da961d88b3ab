"""The peer benchmark's harness: every engine on the same prompt, at 1 and 2 threads, repetitions interleaved.

    .venv/bin/python benchmarks/peers/run.py small smollm2 [--repetitions 5] [--threads 1 2] [--torch]

Needs build.py's models (.work/<model>/). Each measurement is a new process (worker.py in the engine's venv), so the
peak RSS is that engine's own; one repetition runs every (engine, threads) once, in an order rotated each time, so a
slow moment of a shared machine falls on all of them. Reports the median (and min–max) of each figure over the
repetitions and writes results/<model>.json, results/<model>.md and results/<model>.svg.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = HERE / "results"
PYTHON = {"spj": REPO / ".venv" / "bin" / "python", "torch": REPO / ".venv" / "bin" / "python",
          "llama": HERE / ".venv-llama" / "bin" / "python", "genai": HERE / ".venv-genai" / "bin" / "python"}
FIGURES = ("decode_tokens_per_s", "prompt_ms", "prompt128_ms", "peak_rss_mb", "load_s")


@dataclass(frozen=True)
class Config:
    engine: str  # worker.py's engine
    label: str  # as the table names it
    precision: str  # float | int8 | int4
    model: Path  # what worker.py loads

    @property
    def name(self) -> str:
        return f"{self.label} {self.precision}"


def configs(work: Path, torch: bool) -> list[Config]:
    """Every engine and precision build.py made for one model, ours last in each precision."""
    listed = [
        Config("torch", "transformers eager", "float", work / "hf"),
        Config("genai", "onnxruntime-genai", "float", work / "genai" / "fp32"),
        Config("llama", "llama.cpp F16", "float", work / "gguf" / "f16.gguf"),
        Config("spj", "spj-edge", "float", work / "fp32.spj"),
        Config("llama", "llama.cpp Q8_0", "int8", work / "gguf" / "q8_0.gguf"),
        Config("spj", "spj-edge static", "int8", work / "int8.spj"),
        Config("genai", "onnxruntime-genai", "int4", work / "genai" / "int4"),
        Config("llama", "llama.cpp Q4_0", "int4", work / "gguf" / "q4_0.gguf"),
        # SmolLM2's GGUF as it comes (Q4_1, a Q8_0 LM head): the grids our int4 keeps
        Config("llama", "llama.cpp Q4_1, the GGUF as shipped", "int4", work / "gguf" / "shipped.gguf"),
        Config("spj", "spj-edge", "int4", work / "int4.spj"),
        # both in blocks of 128 weights a scale instead of 32 (build.py makes them for `small`)
        Config("genai", "onnxruntime-genai, blocks of 128", "int4", work / "genai" / "int4-b128"),
        Config("spj", "spj-edge, blocks of 128", "int4", work / "int4-b128.spj"),
    ]
    chosen = [c for c in listed if (torch or c.engine != "torch")]
    missing = [c for c in chosen if not c.model.exists() or not PYTHON[c.engine].exists()]
    for c in missing:
        print(f"run.py: skipping {c.name}: {c.model if not c.model.exists() else PYTHON[c.engine]} missing "
              "(setup.sh, build.py)", file=sys.stderr)
    return [c for c in chosen if c not in missing]


def measure(config: Config, threads: int, prompts: Path, new: int) -> dict:
    command = [str(PYTHON[config.engine]), str(HERE / "worker.py"), "--engine", config.engine, "--model",
               str(config.model), "--threads", str(threads), "--prompts", str(prompts), "--new", str(new)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # llama.cpp's OpenMP pool, torch's too
    env.setdefault("PEERS_LLAMA_EXTRA_BUFFERS", "auto")  # worker.llama_extra_buffers
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(cases: list[tuple[Config, int]], prompts: Path, new: int, repetitions: int) -> dict:
    runs = {case: [] for case in cases}
    for rep in range(repetitions):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            result = measure(*case, prompts, new)
            runs[case].append(result)
            config, threads = case
            shown = (f"{result['decode_tokens_per_s']:.1f} tok/s" if "error" not in result
                     else f"failed: {result['error']}")
            print(f"  rep {rep + 1}/{repetitions} {config.name}, {threads} thr: {shown}", flush=True)
            time.sleep(0.3)  # the last process's threads gone before the next one starts
    return runs


def summarize(samples: list[dict]) -> dict:
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return {"error": samples[0]["error"]}
    out = {"runs": len(ok), "first_ids": ok[0]["first_ids"]}
    for name in FIGURES:
        values = [s[name] for s in ok]
        out[name] = statistics.median(values)
        out[f"{name}_min_max"] = [min(values), max(values)]
    return out


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6


def llama_extra_buffers() -> bool:
    sys.path.insert(0, str(HERE))
    from worker import llama_extra_buffers as chosen
    return chosen()


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f} at the end"


# --- output ------------------------------------------------------------------------------------------------------------
def table(result: dict, threads: list[int]) -> str:
    head = ["engine", "precision", "size MB", *(f"decode tok/s, {t} thr" for t in threads),
            *(f"prompt 32 / 128 ms, {t} thr" for t in threads), "peak RSS MB (1 thr)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["engines"]:
        per = [row["threads"].get(str(t), {}) for t in threads]
        decode = [f"{p['decode_tokens_per_s']:.0f} ({p['decode_tokens_per_s_min_max'][0]:.0f}–"
                  f"{p['decode_tokens_per_s_min_max'][1]:.0f})" if "decode_tokens_per_s" in p else "failed"
                  for p in per]
        prompt = [f"{p['prompt_ms']:.0f} / {p['prompt128_ms']:.0f}" if "prompt_ms" in p else "" for p in per]
        rss = f"{per[0]['peak_rss_mb']:.0f}" if "peak_rss_mb" in per[0] else ""
        lines.append("| " + " | ".join([row["name"], row["precision"], f"{row['size_mb']:.0f}", *decode, *prompt, rss])
                     + " |")
    return "\n".join(lines)


def markdown(result: dict, threads: list[int]) -> str:
    s = result["settings"]
    return (f"# {result['model']}: decode speed, prompt time and memory\n\n"
            f"{s['machine']}; batch 1, a {s['prompt_tokens'][0]}-token prompt of real text and {s['new_tokens']} new "
            f"tokens, greedy, EOS ignored; median (min–max) of {s['repetitions']} interleaved repetitions, each a new "
            f"process. Prompt: ms to the first new token. Peak RSS: the process's VmHWM.\n\n"
            + table(result, threads) + "\n")


def chart(result: dict, threads: list[int], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text as text: a few KB instead of glyph outlines
    import matplotlib.pyplot as plt

    rows = [r for r in result["engines"] if all("decode_tokens_per_s" in r["threads"].get(str(t), {}) for t in threads)]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    height = 0.8 / len(threads)
    for i, t in enumerate(threads):
        ax.barh([y + i * height for y in range(len(rows))],
                [r["threads"][str(t)]["decode_tokens_per_s"] for r in rows], height, label=f"{t} thread(s)")
    ax.set_yticks([y + height * (len(threads) - 1) / 2 for y in range(len(rows))],
                  [f"{r['name']} ({r['precision']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (batch 1, median)")
    ax.set_title(f"{result['model']}: {result['settings']['new_tokens']} new tokens after a "
                 f"{result['settings']['prompt_tokens'][0]}-token prompt")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def gate_of(config: Config) -> dict | None:
    """Our quantized packages' accuracy gate, as quantize wrote it: the table says which were forced through it."""
    if config.engine != "spj" or config.precision == "float":
        return None
    report = config.model.with_suffix("") / "report.json"  # int4.spj was packaged from int4/
    if not report.exists():
        return None
    gate = json.loads(report.read_text())["gate"]
    return {k: gate[k] for k in ("passed", "failures", "bits_per_byte_increase", "top1_agreement_confident")}


def benchmark(model: str, args) -> dict:
    work = HERE / ".work" / model
    prompts = work / "prompt.json"
    if not prompts.exists():
        sys.exit(f"run.py: {prompts} missing (run: .venv/bin/python benchmarks/peers/build.py {model})")
    chosen = configs(work, args.torch)
    print(f"{model}: {len(chosen)} engines × {len(args.threads)} thread counts × {args.repetitions} repetitions")
    runs = interleaved([(c, t) for c in chosen for t in args.threads], prompts, args.new, args.repetitions)
    lengths = {n: len(ids) for n, ids in json.loads(prompts.read_text()).items()}
    return {
        "model": model,
        "settings": {"machine": machine(), "prompt_tokens": [lengths["32"], lengths["128"]], "new_tokens": args.new,
                     "repetitions": args.repetitions, "threads": args.threads,
                     "llama_extra_buffers": llama_extra_buffers()},
        "engines": [{"name": c.label, "precision": c.precision, "engine": c.engine, "size_mb": size_mb(c.model),
                     "gate": gate_of(c),
                     "threads": {str(t): summarize(runs[(c, t)]) for t in args.threads}} for c in chosen],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", choices=["small", "smollm2"])
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--torch", action="store_true", help="also transformers eager (slow to start)")
    ap.add_argument("--llama-extra-buffers", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp's AMX/repacked weight buffers (auto: off where the CPU has AMX, which crashes here)")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="where the tables go (default %(default)s; a folder per CPU keeps each machine's figures)")
    args = ap.parse_args()
    os.environ["PEERS_LLAMA_EXTRA_BUFFERS"] = args.llama_extra_buffers
    args.results.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        result = benchmark(model, args)
        (args.results / f"{model}.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.results / f"{model}.md").write_text(markdown(result, args.threads))
        chart(result, args.threads, args.results / f"{model}.svg")
        print(markdown(result, args.threads))


if __name__ == "__main__":
    main()
