"""The device runtime's memory after loading a package, against the model's size (issue 16's bound).

    .venv/bin/python benchmarks/runtime_memory.py dist/small-int8.spj dist/small-int8.spj.tar.gz ... [--json F]

Each package is loaded in a fresh interpreter (`python -m spj_edge.runtime`'s own imports: onnxruntime, numpy,
tokenizers), which then generates 8 tokens; the figures are its resident set (VmRSS) after the load and after the
tokens, and its peak (VmHWM), from /proc/self/status. The bound is 1.15 × the model's bytes (model.onnx and its
weights, as spj.json lists them) + 60 MB: one copy of the weights, plus the interpreter and onnxruntime's own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUND_FACTOR, BOUND_EXTRA_MB = 1.15, 60

# Runs in the child: nothing imported before the runtime, so that the resident set is the runtime's alone.
CHILD = """
import json, sys
from spj_edge.runtime import Generator

def status():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}

generator = Generator.load(sys.argv[1], threads=1)
loaded = status()
generator.generate("Once upon a time", max_new_tokens=8, temperature=0, ignore_eos=True)
files = generator.manifest["files"]
model = sum(files[name]["bytes"] for name in ("model.onnx", "model.onnx.data") if name in files)
print(json.dumps({"model_mb": model / 2**20, "rss_after_load_mb": loaded["VmRSS"], "peak_load_mb": loaded["VmHWM"],
                  "rss_after_tokens_mb": status()["VmRSS"], "peak_mb": status()["VmHWM"]}))
"""


def measure(package: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(package)], capture_output=True, text=True, check=True,
                          cwd=REPO)
    figures = json.loads(done.stdout)
    figures["bound_mb"] = BOUND_FACTOR * figures["model_mb"] + BOUND_EXTRA_MB
    return {"package": str(package), **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = [measure(p) for p in args.packages]
    print(f"{'package':48} {'model MB':>9} {'RSS load':>9} {'peak load':>9} {'RSS +8 tok':>10} {'peak':>7} "
          f"{'bound':>7}")
    for r in rows:
        print(f"{r['package'][-48:]:48} {r['model_mb']:9.1f} {r['rss_after_load_mb']:9.1f} {r['peak_load_mb']:9.1f} "
              f"{r['rss_after_tokens_mb']:10.1f} {r['peak_mb']:7.1f} {r['bound_mb']:7.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
