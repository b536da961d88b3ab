"""`spj-edge demo`: the whole path on real text, every stage in its own directory under --out.

tokenizer → teacher (tinyshakespeare and the UD dev sets of five languages) → two device models:
  - a smaller student distilled from the teacher's logits;
  - the teacher with half its FFN channels pruned, recovered by distillation;
each → ONNX export at opset 17 (fused graph, verified against PyTorch) → static int8 calibrated on the UD dev sets and
gated on held-out text → package; then held-out bits per byte per language, and sample text from the pruned model's
package through spj_edge.runtime (onnxruntime, numpy, tokenizers: what a Raspberry Pi runs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model
from .data import read_text, tokenize_corpus, windows
from .distill import distill
from .errors import SPJError
from .export import export
from .model import load_preset
from .outputs import print_summary, write_json
from .package import package
from .prune import prune
from .quantize import quantize
from .runtime import Generator
from .tokenizer import build_tokenizer, token_byte_lengths
from .train import TrainOptions, heldout_metrics, train

LANGUAGES = {"en": "en_ewt", "fr": "fr_gsd", "de": "de_gsd", "es": "es_gsd", "zh": "zh_gsdsimp"}
PROMPTS = {"shakespeare": "ROMEO:\n", "en": "The city council", "fr": "Le président de la", "de": "Die Stadt liegt",
           "es": "El gobierno de", "zh": "中国的"}


@dataclass(frozen=True)
class Plan:
    teacher_preset: str
    student_preset: str
    vocab_size: int
    teacher: TrainOptions
    student: TrainOptions  # the distillation of both device models
    sample_tokens: int


FULL = Plan("teacher", "student", 4096,
            TrainOptions(steps=600, batch_size=16, lr=3e-3, eval_every=200, compile=True),
            TrainOptions(steps=200, batch_size=16, lr=2e-3, eval_every=100, compile=True), 64)
# nano is the smallest preset, so the quick student is a nano too: the path is the point, not the ratio.
QUICK = Plan("nano", "nano", 512, TrainOptions(steps=150, batch_size=16, lr=1e-2, eval_every=75),
             TrainOptions(steps=40, batch_size=16, lr=5e-3, eval_every=40), 32)


def find_data(data: str | Path | None) -> Path:
    candidates = [Path(data)] if data else [Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared/data"]
    for root in candidates:
        if (root / "corpus" / "ud").is_dir() and (root / "corpus" / "tinyshakespeare").is_dir():
            return root
    where = data or "../shared/data"
    raise SPJError(f"{where}: no demo data (expected corpus/tinyshakespeare/{{train,val}}.txt and "
                   "corpus/ud/*_{dev,test}.txt; pass --data DIR, laid out like the project's shared/data)")


def run_demo(data: str | Path | None, out: Path, quick: bool = False) -> dict:
    plan = QUICK if quick else FULL
    root = find_data(data)
    corpus = root / "corpus"
    train_files = [corpus / "tinyshakespeare" / "train.txt", *(corpus / "ud" / f"{n}_dev.txt" for n in LANGUAGES.values())]
    heldout_files = {"shakespeare": corpus / "tinyshakespeare" / "val.txt",
                     **{lang: corpus / "ud" / f"{name}_test.txt" for lang, name in LANGUAGES.items()}}
    started = time.perf_counter()

    tokenizer = build_tokenizer(train_files, plan.vocab_size, out / "tokenizer.json", overwrite=True)
    held_out = list(heldout_files.values())
    train(load_preset(plan.teacher_preset), train_files, out / "teacher", plan.teacher, tokenizer=tokenizer,
          val_data=held_out, overwrite=True)
    calib_files = [corpus / "ud" / f"{name}_dev.txt" for name in LANGUAGES.values()]
    distill(out / "teacher", out / "student", preset=plan.student_preset, data=train_files, opts=plan.student,
            val_data=held_out, overwrite=True)
    prune(out / "teacher", out / "pruned", ffn_ratio=0.5, calib=calib_files, overwrite=True)
    distill(out / "teacher", out / "pruned-recovered", student_dir=out / "pruned", data=train_files,
            opts=plan.student, val_data=held_out, overwrite=True)

    rows = {}
    for name in ("teacher", "student", "pruned-recovered"):
        model = load_model(out / name)
        lengths = torch.from_numpy(token_byte_lengths(tokenizer, model.config.vocab_size))
        bits_per_byte = {}
        for lang, path in heldout_files.items():
            held = windows(tokenize_corpus([read_text(path)], tokenizer), model.config.max_position_embeddings)
            bits_per_byte[lang] = heldout_metrics(model, held, lengths, batch_size=16)["bits_per_byte"]
        rows[name] = {"parameters": model.config.num_parameters(), "heldout_bits_per_byte": bits_per_byte}
        if name == "teacher":
            continue
        exported = export(out / name, out / f"{name}-onnx", opset=17, overwrite=True)
        int8 = quantize(out / f"{name}-onnx", out / f"{name}-int8", calib=calib_files, eval_data=held_out,
                        auto_exclude=True, overwrite=True)
        packaged = package(out / f"{name}-int8", out / "dist" / f"{name}-int8.spj", overwrite=True)
        rows[name].update(export={k: exported[k] for k in ("graph", "opset", "nodes", "file_bytes", "checks")},
                          int8={k: int8[k] for k in ("gate", "executed", "file_bytes", "decode_speedup")},
                          package={"path": packaged["out"], "files": packaged["files"]})

    device = Generator.load(out / "dist" / "pruned-recovered-int8.spj")
    samples = {lang: device.generate(prompt, max_new_tokens=plan.sample_tokens, temperature=0.8, top_p=0.95, seed=0)
               for lang, prompt in PROMPTS.items()}

    report = {"stage": "demo", "quick": quick, "data": str(root), "elapsed_s": round(time.perf_counter() - started, 1),
              "models": rows, "samples": {lang: PROMPTS[lang] + text for lang, text in samples.items()}}
    write_json(out / "report.json", report)
    for lang, text in report["samples"].items():
        print(f"--- {lang} ---\n{text}\n")
    summary = []
    for name, row in rows.items():
        bpb = row["heldout_bits_per_byte"]
        line = f"{row['parameters']:,} params, {sum(bpb.values()) / len(bpb):.3f} bits/byte (mean of 6 held-out sets)"
        if "int8" in row:
            gate = row["int8"]["gate"]
            line += (f"; int8 {row['int8']['file_bytes']['static'] / 1e6:.2f} MB, "
                     f"{gate['top1_agreement']:.1%} agreement, {gate['bits_per_byte_increase']:+.2%} bits/byte")
        summary.append((name, line))
    print_summary(f"demo: {out} ({report['elapsed_s']:.0f} s)", summary)
    return report
