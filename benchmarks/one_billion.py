"""The whole path at the 1B size: a random-weight `tinyllama-1.1b` checkpoint → export → quantize (dynamic and static
int8, int4) → package → the runtime (its memory after load; `spj-edge bench` at 1 and 2 threads), each stage a
process of its own under /usr/bin/time (wall time, peak RSS).

    .venv/bin/python benchmarks/one_billion.py --work /tmp/1b [--stages checkpoint export ...]

Random weights: the figures are time, memory and size (each stage's own PyTorch/onnxruntime checks still run; the
quantizers' accuracy gates are forced, as a random model's logits say nothing about quantization). Writes
WORK/one_billion.json and prints a table. A stage that fails is recorded with its one-line error and the rest go on.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "corpus"
TEXT = [DATA / "tinyshakespeare" / "val.txt", DATA / "ud" / "en_ewt_dev.txt"]
SPJ = [sys.executable, "-m", "spj_edge.cli"]
PACKAGES = ("fp32", "dynamic", "static", "int4")

CHECKPOINT = """
import sys, torch
from pathlib import Path
from spj_edge.checkpoint import save_checkpoint
from spj_edge.config import load_preset
from spj_edge.model import Transformer
from spj_edge.tokenizer import special_token_ids, train_tokenizer
texts = [Path(p).read_text(encoding="utf-8") for p in sys.argv[2:]]
tokenizer = train_tokenizer(texts, 32000)
config = load_preset("tinyllama-1.1b").replace(**special_token_ids(tokenizer))
torch.manual_seed(0)
model = Transformer(config)
for p in model.parameters():  # init's scale; the values don't matter
    torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
save_checkpoint(Path(sys.argv[1]), model, tokenizer, {"stage": "train"})
"""


def stages(work: Path) -> dict[str, list]:
    gate = ["--force", "--calib", *map(str, TEXT)]
    return {
        "checkpoint": [sys.executable, "-c", CHECKPOINT, work / "ckpt", *TEXT],
        "export": [*SPJ, "export", "--model", work / "ckpt", "--out", work / "fp32"],
        "quantize-dynamic": [*SPJ, "quantize", "--model", work / "fp32", "--out", work / "dynamic", "--mode",
                             "dynamic", *gate],
        "quantize-static": [*SPJ, "quantize", "--model", work / "fp32", "--out", work / "static", *gate],
        "quantize-int4": [*SPJ, "quantize", "--model", work / "fp32", "--out", work / "int4", "--mode", "int4", *gate],
        **{f"package-{kind}": [*SPJ, "package", "--model", work / kind, "--out", work / f"{kind}.spj"]
           for kind in PACKAGES},
        "runtime-memory": [sys.executable, REPO / "benchmarks" / "runtime_memory.py",
                           *(work / f"{kind}.spj" for kind in PACKAGES),
                           "--json", work / "runtime_memory.json"],
        **{f"bench-{threads}": [*SPJ, "bench", "--model", *(work / f"{kind}.spj" for kind in PACKAGES),
                                "--threads", str(threads), "--new-tokens", "32", "--repetitions", "3",
                                "--json", work / f"bench-{threads}.json"] for threads in (1, 2)},
    }


def timed(command: list) -> dict:
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *map(str, command)], capture_output=True, text=True, cwd=REPO)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    said = [line for line in done.stderr.split("\tCommand being timed:")[0].strip().splitlines()  # the command's own
            if not line.startswith("Command exited with")]  # time's
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": peak and int(peak[1]) / 2**20,
            "returncode": done.returncode, "error": None if done.returncode == 0 else (said or ["?"])[-1][:300]}


def sizes(work: Path) -> dict[str, float]:
    return {str(p.relative_to(work)): p.stat().st_size / 1e9 for p in sorted(work.glob("*/model.onnx*"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", help="default: every stage, in order")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    every = stages(args.work)
    results_path = args.work / "one_billion.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.stages or every:
        print(f"{name} …", flush=True)
        results[name] = timed(every[name])
        print(f"  {results[name]}", flush=True)
        results["file_gb"] = sizes(args.work)
        results_path.write_text(json.dumps(results, indent=1))
    print(f"{'stage':20} {'wall s':>8} {'peak RSS GB':>12}  error")
    for name in every:
        if name in results:
            r = results[name]
            print(f"{name:20} {r['wall_s']:8.1f} {r['peak_rss_gb'] or 0:12.2f}  {r['error'] or ''}")


if __name__ == "__main__":
    main()
