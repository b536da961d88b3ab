"""Issue 13's quality reference: llama.cpp's F16/Q8_0/Q4_0 and the shipped GGUF (Q4_1), and onnxruntime-genai's
int4, of SmolLM2, measured with the figures and on the windows of spj-edge's own quantizer gate, beside our int8 and
int4 exports.

    .venv/bin/python benchmarks/peers/quality.py [smollm2]

Runs in the project's venv: the windows are cut and every figure computed by spj_edge's own functions
(quantize.prepare_text, Reference, compare, gate_figures; metrics.figures), so the rows for llama.cpp mean exactly
what our gate's mean. A peer's logits come from logits_server.py in its own venv, one window at a time through a pipe
(nothing written to disk). Two sets of windows:
- the gate's: the 24 held-out windows `spj-edge quantize --eval` scores (UD *_test and tinyshakespeare val, pooled);
  bits per byte, top-1 agreement with our float32 export (overall and where float32 is confident) and KL;
- per file, as `spj-edge eval` cuts them (windows of 128 tokens spread evenly; eval's default is 32 a file,
  --file-windows): bits per byte per language.
Writes results/<model>-quality.json and .md, again after each mode (a long run keeps what it has measured).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spj_edge.data import read_texts, spaced_windows, tokenize_corpus
from spj_edge.metrics import figures
from spj_edge.onnx_lm import OnnxLM
from spj_edge.options import EvalOptions, QuantizeOptions
from spj_edge.quantize import Reference, compare, float_export, gate_figures, prepare_text
from spj_edge.tokenizer import token_byte_lengths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import CALIB, EVAL, HERE  # noqa: E402  (the files quantize was given, in its order)
from run import PYTHON, RESULTS, size_mb  # noqa: E402


class PeerLM:
    """A peer engine in its own venv, with OnnxLM's window_logits: what Reference.of and compare call."""

    def __init__(self, engine: str, model: Path):
        self.process = subprocess.Popen([str(PYTHON[engine]), str(HERE / "logits_server.py"), engine, str(model)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        self.process.stdin.write((json.dumps([int(i) for i in window]) + "\n").encode())
        self.process.stdin.flush()
        header = self.process.stdout.read(8)
        if len(header) < 8:
            sys.exit(f"quality.py: the logits server stopped (exit code {self.process.wait()})")
        rows, vocab = np.frombuffer(header, np.int32)
        data = self.process.stdout.read(int(rows) * int(vocab) * 4)
        return np.frombuffer(data, np.float32).reshape(rows, vocab)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


@dataclass(frozen=True)
class Mode:
    name: str
    engine: str  # "onnx" (ours, run as the gate runs it) or a peer of logits_server.py
    model: Path  # what the engine loads
    file: Path  # what the size column counts


def modes(work: Path) -> list[Mode]:
    listed = [Mode("spj-edge float32 (reference)", "onnx", work / "onnx" / "model.onnx", work / "onnx" / "model.onnx"),
              Mode("spj-edge static int8", "onnx", work / "int8" / "model.onnx", work / "int8" / "model.onnx"),
              Mode("spj-edge int4", "onnx", work / "int4" / "model.onnx", work / "int4" / "model.onnx"),
              Mode("llama.cpp Q8_0", "llama", work / "gguf" / "q8_0.gguf", work / "gguf" / "q8_0.gguf"),
              Mode("llama.cpp Q4_0", "llama", work / "gguf" / "q4_0.gguf", work / "gguf" / "q4_0.gguf"),
              Mode("llama.cpp Q4_1, the GGUF as shipped", "llama", work / "gguf" / "shipped.gguf",
                   work / "gguf" / "shipped.gguf"),
              Mode("llama.cpp F16 (pipeline check)", "llama", work / "gguf" / "f16.gguf", work / "gguf" / "f16.gguf"),
              Mode("onnxruntime-genai int4", "genai", work / "genai" / "int4", work / "genai" / "int4"),
              Mode("llama.cpp F32 (pipeline check)", "llama", work / "gguf" / "f32.gguf", work / "gguf" / "f32.gguf")]
    for m in listed:
        if not m.model.exists():
            print(f"quality.py: skipping {m.name}: {m.model} missing (setup.sh, build.py)", file=sys.stderr)
    return [m for m in listed if m.model.exists()]


def per_file_windows(tokenizer, files: list[str], count: int) -> dict[str, list[np.ndarray]]:
    """Each file's windows as `spj-edge eval --windows count` cuts them (evaluate.run)."""
    options = EvalOptions(windows=count)
    return {Path(path).name: spaced_windows(tokenize_corpus([text], tokenizer), options.window_tokens, options.windows)
            for path, text in read_texts(files).items()}


def language(file: str) -> str:
    return "shakespeare" if file == "val.txt" else file.split("_")[0]


def measure(lm, reference: Reference, gate_windows, file_windows, byte_lengths) -> dict:
    gate = gate_figures(compare(reference, lm, gate_windows, byte_lengths))
    per_file = {language(f): figures(((w, lm.window_logits(w)) for w in ws), byte_lengths).bits_per_byte
                for f, ws in file_windows.items()}
    return {"gate": gate, "bits_per_byte": per_file}


def open_lm(mode: Mode, config):
    return OnnxLM(mode.model, config) if mode.engine == "onnx" else PeerLM(mode.engine, mode.model)


def report_gate(mode: Mode) -> dict | None:
    """What `spj-edge quantize` itself reported for our exports: the same figures, to check this script against."""
    path = mode.model.parent / "report.json"
    if mode.engine != "onnx" or not path.exists():
        return None
    gate = json.loads(path.read_text()).get("gate")
    return gate and {k: gate[k] for k in ("bits_per_byte_increase", "top1_agreement", "top1_agreement_confident",
                                          "kl", "passed")}


def evaluate(model: str, file_windows_count: int, save, only: list[str] | None = None) -> None:
    """Measures each mode in turn, handing `save` the result so far after each. With `only` (substrings of mode
    names), the other modes' rows are kept from the last results file."""
    work = HERE / ".work" / model
    float_model = float_export(work / "onnx")
    config, tokenizer = float_model.config, float_model.tokenizer
    byte_lengths = token_byte_lengths(tokenizer, config.vocab_size)
    _, gate_windows = prepare_text(float_model, CALIB, EVAL, QuantizeOptions(mode="int4"))  # the int4 gate's = int8's
    file_windows = per_file_windows(tokenizer, EVAL, file_windows_count)
    reference = Reference.of(OnnxLM(float_model.graph_path, config), gate_windows, byte_lengths)
    previous = RESULTS / f"{model}-quality.json"
    kept = {r["mode"]: r for r in json.loads(previous.read_text())["rows"]} if only and previous.exists() else {}
    rows = []
    result = {"model": model, "settings": {
        "gate_windows": len(gate_windows), "gate_text": [Path(p).name for p in EVAL],
        "per_file_windows": {language(f): len(ws) for f, ws in file_windows.items()},
        "window_tokens": len(gate_windows[0]), "confident_margin_logits": 1.0}, "rows": rows}
    for mode in modes(work):
        if only and not any(o in mode.name for o in only):
            if mode.name in kept:
                rows.append(kept[mode.name])
            continue
        print(f"quality: {mode.name}", flush=True)
        lm = open_lm(mode, config)
        rows.append({"mode": mode.name, "engine": mode.engine, "size_mb": size_mb(mode.file),
                     **measure(lm, reference, gate_windows, file_windows, byte_lengths),
                     "quantize_report_gate": report_gate(mode)})
        if isinstance(lm, PeerLM):
            lm.close()
        save(result)
    save(result)  # with the rows kept after the last one measured


def markdown(result: dict) -> str:
    languages = list(result["settings"]["per_file_windows"])
    head = ["mode", "size MB", *(f"bpb {l}" for l in languages), "bpb (gate windows)", "Δ bpb",
            "top-1 agr.", "top-1 agr. confident", "KL nats"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        g = r["gate"]
        lines.append("| " + " | ".join([
            r["mode"], f"{r['size_mb']:.0f}", *(f"{r['bits_per_byte'][l]:.4f}" for l in languages),
            f"{g['bits_per_byte']:.4f}", f"{g['bits_per_byte_increase']:+.2%}", f"{g['top1_agreement']:.2%}",
            f"{g['top1_agreement_confident']:.2%}", f"{g['kl']:.4f}"]) + " |")
    s = result["settings"]
    return (f"# {result['model']}: quality of each quantization against spj-edge's float32 export\n\n"
            f"Per language: bits per byte on {next(iter(s['per_file_windows'].values()))} windows of "
            f"{s['window_tokens']} tokens per file, cut as `spj-edge eval` cuts them. Gate columns: the "
            f"{s['gate_windows']} held-out windows of `spj-edge quantize`'s accuracy gate ({', '.join(s['gate_text'])} "
            f"pooled), with its functions: Δ bpb against float32, top-1 agreement with float32 overall and where "
            f"float32's top logit leads the second by ≥ {s['confident_margin_logits']} (the gate's criterion), "
            f"KL(float32 ‖ mode) per position.\n\n" + "\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--file-windows", type=int, default=EvalOptions().windows, help="per file (default: eval's)")
    ap.add_argument("--only", nargs="+", help="measure only the modes whose names contain one of these (e.g. Q8_0); "
                    "the other rows are kept from the last results")
    args = ap.parse_args()
    if not (HERE / ".work" / args.model / "onnx").exists():
        sys.exit(f"quality.py: run build.py {args.model} first")
    RESULTS.mkdir(exist_ok=True)

    def save(result: dict) -> None:
        (RESULTS / f"{args.model}-quality.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / f"{args.model}-quality.md").write_text(markdown(result))
        print(markdown(result), flush=True)

    evaluate(args.model, args.file_windows, save, args.only)


if __name__ == "__main__":
    main()
