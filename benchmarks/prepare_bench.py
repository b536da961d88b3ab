"""Issue 17's figures: `spj-edge prepare` throughput and memory, training from shards against the in-memory path, peak
memory of training as the corpus grows, and a 2-node loopback torchrun against one process.

    .venv/bin/python benchmarks/prepare_bench.py --corpus-mb 100 --work /tmp/spj-bench

Everything is written under --work (in /tmp: delete it afterwards). The corpus is prepare_corpus.py's: shuffled
repetitions of ../shared/data's text as SlimPajama-style .jsonl.zst, fine for throughput and memory only. Every
figure is one command's own: its report.json (prepare's MB/s, training's tokens/s) and its peak RSS as the kernel
counts it for that process tree (os.wait4). Training runs of a comparison are interleaved, median of --repeats.
The "large" corpus for the memory curve is the prepared corpus's shards listed --scale times over in one index (the
same bytes under new names): memory-mapping reads a shard the same whatever it holds, so training's memory is measured
at --scale times the corpus without tokenizing that much text.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SPJ = [sys.executable, "-m", "spj_edge.cli"]


def run(command: list, env: dict | None = None) -> float:
    """Run to the end; the peak RSS in MB of the process (for torchrun, the launcher's; see run_tree)."""
    process = subprocess.Popen(list(map(str, command)), cwd=REPO, env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(map(str, command))}\n{stderr.decode()[-3000:]}")
    return usage.ru_maxrss / 1024


def prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    run([*SPJ, "prepare", "--data", corpus, "--tokenizer", tokenizer, "--out", out, "--workers", workers])
    return json.loads((out / "report.json").read_text())


def scaled_copy(prepared: Path, out: Path, times: int) -> float:
    """`prepared`'s shards listed `times` over under new names (hard links): a corpus `times` as large to map."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    index = json.loads((prepared / "index.json").read_text())
    for splits in index["sources"].values():
        for split, entry in splits.items():
            shards = []
            for k in range(times):
                for shard in entry["shards"]:
                    name = shard["name"].replace(".bin", f"-copy{k}.bin")
                    os.link(prepared / shard["name"], out / name)
                    shards.append({**shard, "name": name})
            entry.update(shards=shards, tokens=entry["tokens"] * times, documents=entry["documents"] * times)
    (out / "index.json").write_text(json.dumps(index))
    shutil.copy(prepared / "tokenizer.json", out / "tokenizer.json")
    return sum(e["tokens"] for s in index["sources"].values() for e in s.values())


def train(data: Path, out: Path, steps: int, env: dict | None = None, extra: list = ()) -> tuple[float, float]:
    """(tokens/s, peak RSS MB) of `steps` steps of the student preset on `data`."""
    shutil.rmtree(out, ignore_errors=True)
    rss = run([*SPJ, "train", "--preset", "student", "--data", data, "--tokenizer", TOKENIZER, "--steps", steps,
               "--batch-size", 8, "--eval-every", steps, "--eval-windows", 8, "--precision", "fp32", "--out", out,
               *extra], env)
    return json.loads((out / "report.json").read_text())["tokens_per_s"], rss


def two_nodes(data: Path, out: Path, steps: int) -> float:
    """tokens/s of two torchrun launchers, one rank each, meeting at a c10d rendezvous on 127.0.0.1."""
    shutil.rmtree(out, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "bench", "-m", "spj_edge.cli",
              "train", "--preset", "student", "--data", data, "--tokenizer", TOKENIZER, "--steps", steps,
              "--batch-size", 8, "--eval-every", steps, "--eval-windows", 8, "--precision", "fp32", "--out", out]
    nodes = [subprocess.Popen(list(map(str, launch)), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for node in nodes:
        if node.wait() != 0:
            sys.exit(f"2-node run failed:\n{node.stderr.read().decode()[-3000:]}")
    return json.loads((out / "report.json").read_text())["tokens_per_s"]


def batch_seconds(corpus: Path, shards: Path, batches: int = 300) -> dict:
    """Seconds per training batch (8 windows of the student's 257 tokens) taken from the shards and from the same
    corpus in memory, in this process: the whole of what the data path adds to a step, measured without the
    model's compute, whose noise on a shared machine is larger than the 3 % to be resolved."""
    import time

    from spj_edge.options import TrainOptions
    from spj_edge.tokenizer import load_tokenizer
    from spj_edge.train import load_dataset

    tokenizer, opts = load_tokenizer(TOKENIZER), TrainOptions(eval_windows=8)
    timings = {}
    for name, data in (("in_memory", corpus), ("shards", shards)):
        dataset = load_dataset([data], tokenizer, 256, opts)
        started = time.perf_counter()
        for step in range(batches):
            dataset.train_batch(opts.seed, step * 8, 8)
        timings[name] = (time.perf_counter() - started) / batches
    return timings


def main() -> None:
    global TOKENIZER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=float, default=100)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spj-bench"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=int, default=20, help="the memory curve's largest corpus: this × --corpus-mb")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    TOKENIZER = work / "tokenizer.json"
    figures: dict = {"corpus_mb": args.corpus_mb, "cpus": os.cpu_count(), "load_before": os.getloadavg()}

    corpora = {}
    for mb in (10, args.corpus_mb):
        corpora[mb] = work / f"corpus-{mb:g}mb.jsonl.zst"
        if not corpora[mb].exists():
            run([sys.executable, REPO / "benchmarks" / "prepare_corpus.py", "--mb", mb, "--out", corpora[mb]])
    if not TOKENIZER.exists():
        run([*SPJ, "tokenizer", "--data", SHARED / "corpus" / "tinyshakespeare" / "train.txt",
             *sorted((SHARED / "corpus" / "ud").glob("*_dev.txt")), "--vocab-size", 4096, "--out", TOKENIZER])

    # prepare: MB/s of text and peak memory at 1 and 2 workers
    for workers in (1, 2):
        report = prepare(corpora[args.corpus_mb], TOKENIZER, work / f"shards-w{workers}", workers)
        figures[f"prepare_{workers}_workers"] = {"mb_per_s": round(report["mb_per_s"], 2), "seconds": report["seconds"],
                                                 "peak_rss_mb": report["peak_rss_mb"]}
        print(f"prepare, {workers} workers: {report['mb_per_s']:.2f} MB/s, peak RSS {report['peak_rss_mb']}", flush=True)
    same = all((work / "shards-w1" / f).read_bytes() == (work / "shards-w2" / f).read_bytes()
               for f in os.listdir(work / "shards-w1") if f != "report.json")
    figures["same_bytes_for_1_and_2_workers"] = same
    small = work / "shards-10mb"
    prepare(corpora[10], TOKENIZER, small, 2)

    # training: shards against the in-memory path on the same 10 MB corpus, interleaved
    memory, mapped = [], []
    for _ in range(args.repeats):
        memory.append(train(corpora[10], work / "run-memory", args.steps))
        mapped.append(train(small, work / "run-shards", args.steps))
    figures["train_tokens_per_s"] = {"in_memory": [round(t) for t, _ in memory], "shards": [round(t) for t, _ in mapped]}
    figures["train_peak_rss_mb"] = {"in_memory_10mb": max(r for _, r in memory), "shards_10mb": max(r for _, r in mapped)}
    ratio = statistics.median(t for t, _ in mapped) / statistics.median(t for t, _ in memory)
    figures["shards_over_in_memory"] = round(ratio, 4)
    print(f"train: shards / in-memory tokens/s = {ratio:.3f}", flush=True)
    figures["batch_seconds"] = batch_seconds(corpora[10], small)
    step_seconds = 8 * 256 / statistics.median(t for t, _ in mapped)
    figures["data_share_of_a_step"] = {k: v / step_seconds for k, v in figures["batch_seconds"].items()}
    print(f"train: seconds per batch from the data path {figures['batch_seconds']}, of a step of "
          f"{step_seconds:.2f} s", flush=True)

    # peak memory of training from shards as the corpus grows
    large = work / "shards-large"
    large_tokens = scaled_copy(work / "shards-w1", large, args.scale)
    _, rss_corpus = train(work / "shards-w1", work / "run-corpus", args.steps)
    _, rss_large = train(large, work / "run-large", args.steps)
    figures["train_peak_rss_mb"].update({f"shards_{args.corpus_mb:g}mb": rss_corpus,
                                         f"shards_{args.corpus_mb * args.scale:g}mb_equivalent": rss_large,
                                         "large_tokens": large_tokens})
    print(f"train peak RSS: {figures['train_peak_rss_mb']}", flush=True)

    # two nodes over loopback against one process with the same global batch (2 micro-batches of 8)
    single = [train(small, work / "run-single", args.steps, {"OMP_NUM_THREADS": "2"}, ["--grad-accum", 2])[0]
              for _ in range(2)]
    nodes = [two_nodes(small, work / "run-2nodes", args.steps) for _ in range(2)]
    figures["two_nodes_tokens_per_s"] = {"one_process_2_threads": [round(t) for t in single],
                                         "two_nodes_1_thread_each": [round(t) for t in nodes]}
    figures["load_after"] = os.getloadavg()
    print(json.dumps(figures, indent=2))
    (work / "figures.json").write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
