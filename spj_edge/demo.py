"""`spj-edge demo`: the whole path on real text, every stage in its own directory under --out.

So far: tokenizer → teacher (trained on tinyshakespeare and the UD dev sets of five languages) → held-out bits per byte
per language → ONNX export at opset 17 (fused graph, verified against PyTorch) → static int8 calibrated on the UD dev
sets, gated on held-out text → package → sample text from the package through spj_edge.runtime.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import read_text, tokenize_corpus, windows
from .errors import SPJError
from .export import export
from .model import load_preset
from .outputs import print_summary, write_json
from .package import package
from .quantize import quantize
from .runtime import Generator
from .tokenizer import build_tokenizer, token_byte_lengths
from .train import TrainOptions, heldout_metrics, train

LANGUAGES = {"en": "en_ewt", "fr": "fr_gsd", "de": "de_gsd", "es": "es_gsd", "zh": "zh_gsdsimp"}
PROMPTS = {"shakespeare": "ROMEO:\n", "en": "The city council", "fr": "Le président de la", "de": "Die Stadt liegt",
           "es": "El gobierno de", "zh": "中国的"}


@dataclass(frozen=True)
class Plan:
    preset: str
    vocab_size: int
    teacher: TrainOptions
    sample_tokens: int


FULL = Plan("teacher", 4096, TrainOptions(steps=600, batch_size=16, lr=3e-3, eval_every=200, compile=True), 64)
QUICK = Plan("nano", 512, TrainOptions(steps=150, batch_size=16, lr=1e-2, eval_every=75), 32)


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
    model, tokenizer, teacher_report = train(
        load_preset(plan.preset), train_files, out / "teacher", plan.teacher, tokenizer=tokenizer,
        val_data=list(heldout_files.values()), overwrite=True)

    lengths = torch.from_numpy(token_byte_lengths(tokenizer, model.config.vocab_size))
    per_language = {}
    for lang, path in heldout_files.items():
        held = windows(tokenize_corpus([read_text(path)], tokenizer), model.config.max_position_embeddings)
        per_language[lang] = heldout_metrics(model, held, lengths, batch_size=16)["bits_per_byte"]
    export_report = export(out / "teacher", out / "onnx", opset=17, overwrite=True)
    calib_files = [corpus / "ud" / f"{name}_dev.txt" for name in LANGUAGES.values()]
    int8_report = quantize(out / "onnx", out / "int8", calib=calib_files, eval_data=list(heldout_files.values()),
                           auto_exclude=True, overwrite=True)
    package_report = package(out / "int8", out / "dist" / "teacher-int8.spj", overwrite=True)
    device = Generator.load(out / "dist" / "teacher-int8.spj")  # what a Pi runs: onnxruntime, numpy, tokenizers
    samples = {lang: device.generate(prompt, max_new_tokens=plan.sample_tokens, temperature=0.8, top_p=0.95, seed=0)
               for lang, prompt in PROMPTS.items()}

    report = {"stage": "demo", "quick": quick, "data": str(root), "elapsed_s": round(time.perf_counter() - started, 1),
              "teacher": {"parameters": teacher_report["parameters"], "steps": teacher_report["step"],
                          "tokens_per_s": teacher_report["tokens_per_s"],
                          "heldout_bits_per_byte": per_language},
              "export": {k: export_report[k] for k in ("graph", "opset", "nodes", "file_bytes", "checks")},
              "int8": {k: int8_report[k] for k in ("gate", "executed", "file_bytes", "decode_speedup")},
              "package": {"path": package_report["out"], "files": package_report["files"]},
              "samples": {lang: PROMPTS[lang] + text for lang, text in samples.items()}}
    write_json(out / "report.json", report)
    for lang, text in report["samples"].items():
        print(f"--- {lang} ---\n{text}\n")
    print_summary(f"demo: {out} ({report['elapsed_s']:.0f} s), teacher held-out bits per byte",
                  [(lang, round(bpb, 3)) for lang, bpb in per_language.items()])
    return report
