"""`spj-edge demo`: the whole path on real text, every stage in its own directory under --out, and REPORT.md.

tokenizer → teacher (tinyshakespeare and the UD dev sets of five languages) → student distilled from the teacher's
logits → the student pruned (half its FFN channels, a third of its query heads) and recovered by distillation →
ONNX at opset 17 (fused graph, verified against PyTorch) → static int8 calibrated on the UD dev sets and gated on
held-out text → package → eval and bench of every stage on held-out text → sample text from the package through
spj_edge.runtime (onnxruntime, numpy, tokenizers: what a Raspberry Pi runs). Then, full mode only, the same path from
import on for a real pretrained model, SmolLM2-135M-Instruct from ../shared/models (beside the data), ending in one
chat reply from its int8 package: what our small models cannot show (the gate and the speed on a model people use, and
an answer that makes sense). Without that file the demo says so in REPORT.md and leaves the stage out.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import evaluate as ev
from .bench import bench
from .config import load_preset
from .distill import distill
from .errors import SPJError
from .export import export
from .import_gguf import import_gguf
from .options import BenchOptions, EvalOptions, PruneOptions, QuantizeOptions, TrainOptions
from .outputs import claim_output_dir, write_json, write_text
from .package import package
from .prune import prune
from .quantize import quantize
from .runtime import Generator
from .tables import print_table
from .tokenizer_stage import build_tokenizer
from .train import train

LANGUAGES = {"en": "en_ewt", "fr": "fr_gsd", "de": "de_gsd", "es": "es_gsd", "zh": "zh_gsdsimp"}
HELDOUT = ("shakespeare", *LANGUAGES)  # tinyshakespeare's val split, and each language's UD test set
PROMPTS = {"shakespeare": "ROMEO:\n", "en": "The city council", "fr": "Le président de la", "de": "Die Stadt liegt",
           "es": "El gobierno de", "zh": "中国的"}
DATA_HELP = ("expected corpus/tinyshakespeare/{train,val}.txt (karpathy/char-rnn's tinyshakespeare input.txt, split "
             "90/10) and corpus/ud/{en_ewt,fr_gsd,de_gsd,es_gsd,zh_gsdsimp}_{dev,test}.txt (the `# text` lines of "
             "those Universal Dependencies treebanks, one sentence per line); optional nltk_data/corpora/wordnet for "
             "METEOR. Pass --data DIR laid out so, like the project's shared/data")


@dataclass(frozen=True)
class Plan:
    teacher_preset: str
    student_preset: str
    vocab_size: int
    teacher: TrainOptions
    student: TrainOptions  # distilling the student, and recovering it after pruning
    head_ratio: float  # of the query heads in each KV group, pruned
    eval: EvalOptions
    bench_new_tokens: int
    bench_repetitions: int
    sample_tokens: int


FULL = Plan("teacher", "student", 4096,
            TrainOptions(steps=600, batch_size=16, lr=3e-3, eval_every=200, compile=True),
            TrainOptions(steps=200, batch_size=16, lr=2e-3, eval_every=100, compile=True), 1 / 3,
            EvalOptions(windows=16, prompts=16, new_tokens=24), 128, 3, 64)
# nano is the smallest preset, so the quick student is a nano too: the path is the point, not the ratio.
QUICK = Plan("nano", "nano", 512, TrainOptions(steps=150, batch_size=16, lr=1e-2, eval_every=75),
             TrainOptions(steps=40, batch_size=16, lr=5e-3, eval_every=40), 0.5,
             EvalOptions(windows=4, prompts=4, new_tokens=12), 32, 2, 32)


@dataclass(frozen=True)
class Stage:
    name: str
    path: Path
    parent: str | None  # the stage it was made from: agreement is measured against it
    what: str


def find_data(data: str | Path | None) -> Path:
    candidates = [Path(data)] if data else [Path("../shared/data"), Path(__file__).resolve().parents[2] / "shared/data"]
    for root in candidates:
        if (root / "corpus" / "ud").is_dir() and (root / "corpus" / "tinyshakespeare").is_dir():
            return root
    where = data or "../shared/data"
    raise SPJError(f"{where}: no demo data: {DATA_HELP}")


PRETRAINED = "SmolLM2-135M-Instruct.Q4_1.gguf"
# float32 answers it with every token at least 1 logit ahead; "What is the capital of France?" starts on a near tie
# ("The" 0.08 ahead of "L", then "'Étoile, la Cité…"), which int8's rounding may turn either way
CHAT = [{"role": "user", "content": "Name the capital of France."}]
PRETRAINED_STEPS = ("import", "export", "quantize", "package", "chat")


def find_pretrained(quick: bool, models: Path) -> tuple[Path | None, str | None]:
    """The GGUF the pretrained stage imports from `models` (../shared/models, beside ../shared/data), or None and the
    reason the demo leaves the stage out. It is read where it lies, never copied into the repository."""
    if quick:
        return None, "--quick leaves it out (import, export and quantize of a 135M model take minutes)"
    if not (models / PRETRAINED).is_file():
        return None, f"{models / PRETRAINED}: not found, so this demo left the stage out"
    return models / PRETRAINED, None


def default_out(quick: bool) -> Path:
    return Path("runs/demo-quick" if quick else "runs/demo")


def refuse_other_run(out: Path, quick: bool, overwrite: bool) -> None:
    """A rerun replaces the same kind of demo; anything else in `out` (a finished run of the other mode, or files
    that are no demo's) is kept unless --overwrite says otherwise."""
    if overwrite or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        previous = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict) or previous.get("stage") != "demo":
        raise SPJError(f"{out}: already exists and is not a demo's output (pass --overwrite to replace it)")
    if previous.get("quick") != quick:
        other, mode = ("--quick", "full") if previous.get("quick") else ("full", "--quick")
        raise SPJError(f"{out}: holds a finished {other} demo, which a {mode} one would replace (pass --overwrite, "
                       "or another --out)")


def run_demo(data: str | Path | None, out: Path | None = None, quick: bool = False, overwrite: bool = False) -> dict:
    plan = QUICK if quick else FULL
    out = default_out(quick) if out is None else Path(out)
    root = find_data(data)
    gguf, skipped = find_pretrained(quick, root.resolve().parent / "models")
    refuse_other_run(out, quick, overwrite)
    claim_output_dir(out, [root], overwrite=True)  # even with --overwrite, never a folder that spj-edge did not write
    corpus = root / "corpus"
    train_files = [corpus / "tinyshakespeare" / "train.txt", *(corpus / "ud" / f"{n}_dev.txt" for n in LANGUAGES.values())]
    calib_files = [corpus / "ud" / f"{name}_dev.txt" for name in LANGUAGES.values()]
    heldout = dict(zip(HELDOUT, [corpus / "tinyshakespeare" / "val.txt",
                                 *(corpus / "ud" / f"{name}_test.txt" for name in LANGUAGES.values())]))
    held_out = list(heldout.values())
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    stages = [
        Stage("teacher", out / "teacher", None, f"{plan.teacher_preset} preset, {plan.teacher.steps} steps"),
        Stage("student", out / "student", "teacher", f"{plan.student_preset} preset distilled, {plan.student.steps} steps"),
        Stage("pruned", out / "pruned", "student", f"FFN −50%, query heads −{plan.head_ratio:.0%} per KV group"),
        Stage("pruned-recovered", out / "pruned-recovered", "student", f"distilled {plan.student.steps} steps"),
        Stage("onnx-fp32", out / "onnx-fp32", "pruned-recovered", "fused graph, opset 17"),
        Stage("int8", out / "int8", "onnx-fp32", "static int8, calibrated"),
        Stage("package", out / "dist" / "model.spj", "int8", "int8 through spj_edge.runtime"),
    ]
    # the tokenizer, each stage built then evaluated, the bench, the samples, and the pretrained model's steps
    total = 1 + 2 * len(stages) + 2 + (len(PRETRAINED_STEPS) if gguf else 0)

    def timed(name: str, action):
        print(f"demo: stage {len(seconds) + 1} of {total}: {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = action()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return result

    tokenizer = timed("tokenizer", lambda: build_tokenizer(train_files, plan.vocab_size, out / "tokenizer.json",
                                                           overwrite=True))
    timed("teacher", lambda: train(load_preset(plan.teacher_preset), train_files, out / "teacher", plan.teacher,
                                   tokenizer=tokenizer, val_data=held_out, overwrite=True))
    timed("student", lambda: distill(out / "teacher", out / "student", preset=plan.student_preset, data=train_files,
                                     opts=plan.student, val_data=held_out, overwrite=True))
    timed("pruned", lambda: prune(out / "student", out / "pruned", calib=calib_files,
                                  options=PruneOptions(ffn_ratio=0.5, head_ratio=plan.head_ratio), overwrite=True))
    timed("pruned-recovered", lambda: distill(out / "teacher", out / "pruned-recovered", student_dir=out / "pruned",
                                              data=train_files, opts=plan.student, val_data=held_out, overwrite=True))
    exported = timed("onnx-fp32", lambda: export(out / "pruned-recovered", out / "onnx-fp32", opset=17, overwrite=True))
    int8 = timed("int8", lambda: quantize(out / "onnx-fp32", out / "int8", calib=calib_files, eval_data=held_out,
                                          options=QuantizeOptions(auto_exclude=True), overwrite=True))
    packaged = timed("package", lambda: package(out / "int8", out / "dist" / "model.spj", overwrite=True))

    texts = {path: path.read_text(encoding="utf-8") for path in held_out}
    meteor = ev.wordnet_available([root / "nltk_data"])
    results, models = {}, {}
    for stage in stages:
        model = ev.scorer(stage.path)
        models[stage.name] = ev.describe(model, stage.path)
        results[stage.name] = timed(f"eval {stage.name}", lambda: ev.run(model, texts, plan.eval, f"eval {stage.name}"))
    evals = {s.name: ev.build_report(models[s.name], results[s.name], plan.eval, meteor,
                                     models.get(s.parent), results.get(s.parent)) for s in stages}
    (out / "eval").mkdir(exist_ok=True)
    for s in stages:
        write_json(out / "eval" / f"{s.name}.json", evals[s.name])

    quality = {s.name: evals[s.name]["all"]["bits_per_byte"] for s in stages}
    speed = timed("bench", lambda: bench(
        [s.path for s in stages if s.name in ("onnx-fp32", "int8", "package")],
        [s.path for s in stages if s.name not in ("onnx-fp32", "int8", "package")],
        options=BenchOptions(new_tokens=plan.bench_new_tokens, repetitions=plan.bench_repetitions),
        json_out=out / "bench.json",
        chart=out / "bench.png", labels={str(s.path): s.name for s in stages}, quality=quality))

    device = Generator.load(out / "dist" / "model.spj")
    samples = timed("samples", lambda: {
        lang: PROMPTS[lang] + device.generate(prompt, max_new_tokens=plan.sample_tokens, temperature=0.8, top_p=0.95,
                                              seed=0)
        for lang, prompt in PROMPTS.items()})

    pretrained = ({"skipped": skipped} if gguf is None else
                  run_pretrained(gguf, out / "smollm2", calib_files, held_out, timed, seconds))

    rows = {s.name: table_row(s, evals[s.name], speed["models"][s.name], heldout) for s in stages}
    report = {"stage": "demo", "quick": quick, "data": str(root), "elapsed_s": round(time.perf_counter() - started, 1),
              "files": {"train": list(map(str, train_files)), "calibration": list(map(str, calib_files)),
                        "heldout": {name: str(path) for name, path in heldout.items()}},
              "seconds": seconds, "stages": {s.name: {"path": str(s.path), "made_from": s.parent, "what": s.what}
                                             for s in stages},
              "table": rows, "export": {k: exported[k] for k in ("graph", "opset", "nodes", "file_bytes", "checks")},
              "int8": {k: int8[k] for k in ("gate", "executed", "file_bytes", "decode_speedup")},
              "package": {"path": packaged["out"], "files": packaged["files"]},
              "bench": {"machine": speed["machine"], "settings": speed["settings"],
                        "models": {name: {"roofline_warning": row.get("roofline_warning")}
                                   for name, row in speed["models"].items()}},
              "eval_settings": evals["teacher"]["settings"], "samples": samples, "pretrained": pretrained}
    write_json(out / "report.json", report)
    write_text(out / "REPORT.md", markdown_report(report, out, stages, evals))
    for lang, text in samples.items():
        print(f"--- {lang} ---\n{text}\n")
    if "reply" in pretrained:
        print(f"--- SmolLM2-135M-Instruct, int8 ---\n> {CHAT[0]['content']}\n{pretrained['reply']}\n")
    print_table(f"demo: {out} ({report['elapsed_s']:.0f} s); the full report: {out / 'REPORT.md'}", COLUMNS,
                [(name, *(format_cell(key, row[key]) for key in KEYS)) for name, row in rows.items()])
    return report


def run_pretrained(gguf: Path, out: Path, calib: list[Path], held_out: list[Path], timed, seconds: dict) -> dict:
    """import → export → quantize (the defaults: static int8, calibrated and gated as the demo's own) → package → one
    greedy chat reply through spj_edge.runtime, each step timed as a demo stage; the figures REPORT.md shows."""
    steps = dict(zip(PRETRAINED_STEPS, (f"smollm2 {step}" for step in PRETRAINED_STEPS)))
    timed(steps["import"], lambda: import_gguf(gguf, out / "checkpoint", overwrite=True))
    timed(steps["export"], lambda: export(out / "checkpoint", out / "onnx-fp32", opset=17, overwrite=True))
    int8 = timed(steps["quantize"], lambda: quantize(out / "onnx-fp32", out / "int8", calib=calib, eval_data=held_out,
                                                     overwrite=True))
    timed(steps["package"], lambda: package(out / "int8", out / "dist" / "model.spj", overwrite=True))
    device = Generator.load(out / "dist" / "model.spj")
    reply = timed(steps["chat"], lambda: device.chat(CHAT, temperature=0))
    best = int8["speed"][f"threads_{int8['best_threads']}"]
    return {"gguf": str(gguf), "folder": str(out), "seconds": {step: seconds[name] for step, name in steps.items()},
            "file_bytes": int8["file_bytes"],
            "gate": {k: int8["gate"][k] for k in ("bits_per_byte_float", "bits_per_byte", "bits_per_byte_increase",
                                                   "top1_agreement_confident", "confident_share", "top1_agreement",
                                                   "kl", "passed")},
            "matmuls": len(int8["quantized"]) + len(kept_in_float(int8)), "kept_in_float": kept_in_float(int8),
            "eight_bit": int8["eight_bit"], "eight_bit_block_size": int8["settings"]["eight_bit_block_size"],
            "decode_tokens_per_s": {mode: best[mode]["decode_tokens_per_s"] for mode in ("float32", "static")},
            "decode_threads": int8["best_threads"], "prompt": CHAT[0]["content"], "reply": reply}


def kept_in_float(quantize_report: dict) -> dict[str, str]:
    """The weight MatMuls quantize kept in float, with its reason for each (its other exclusions name no node)."""
    return {name: why for name, why in quantize_report["excluded"].items() if name.startswith("/")}


KEYS = ("parameters", "file_mb", *HELDOUT, "agreement", "vs", "bleu", "rougeL", "meteor", "decode_tokens_per_s",
        "roofline_share")
COLUMNS = ["stage", "params", "MB", *(f"{k} bpb" for k in HELDOUT), "agree", "vs", "BLEU", "ROUGE-L", "METEOR",
           "tok/s", "roofline"]


def table_row(stage: Stage, evaluation: dict, speed: dict, heldout: dict[str, Path]) -> dict:
    """One row of the comparison: the figures a person compares stages by."""
    reference = evaluation["all"]["vs_reference"]
    return {"parameters": evaluation["model"]["parameters"], "file_mb": evaluation["model"]["file_bytes"] / 1e6,
            **{name: evaluation["files"][str(path)]["bits_per_byte"] for name, path in heldout.items()},
            "agreement": evaluation["all"].get("top1_agreement"), "vs": stage.parent,
            **{k: reference[k] for k in ("bleu", "rougeL", "meteor")},
            "decode_tokens_per_s": speed["decode_tokens_per_s"], "roofline_share": speed["roofline_share"]}


def format_cell(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "parameters":
        return f"{value / 1e6:.2f}M"
    if key in ("agreement", "roofline_share"):
        return f"{value:.1%}"
    if key in ("file_mb", "bleu"):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if key == "decode_tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_report(report: dict, out: Path, stages: list[Stage], evals: dict[str, dict]) -> str:
    table = report["table"]
    machine, bench_settings = report["bench"]["machine"], report["bench"]["settings"]
    gate = report["int8"]["gate"]
    parts = [
        f"# spj-edge demo{' (--quick)' if report['quick'] else ''}",
        f"The whole path on `{report['data']}` in {report['elapsed_s']:.0f} s. Every stage's output is in this folder, "
        "each with its own `report.json`; `report.json` here holds every figure below.",
        "## Stages",
        markdown_table(["stage", "made from", "what", "folder", "seconds"],
                       [[s.name, s.parent or "-", s.what, f"`{s.path.relative_to(out)}`",
                         f"{report['seconds'][s.name]:.0f}"] for s in stages]),
        "## Comparison",
        "Bits per byte (bpb) on held-out text, one column per file: "
        + ", ".join(f"*{name}* `{path}`" for name, path in report["files"]["heldout"].items())
        + "; lower is better and comparable across tokenizers. Every stage was trained on "
        + ", ".join(f"`{path}`" for path in report["files"]["train"]) + " and calibrated on "
        + ", ".join(f"`{path}`" for path in report["files"]["calibration"]) + ", none of them held out. "
        "*Agree*: top-1 next-token agreement with the stage it was made "
        "from (*vs*). BLEU, ROUGE-L (F1) and METEOR score greedy continuations of held-out half-lines against the "
        "other half. *tok/s*: batch-1 greedy decode, median of interleaved repetitions; *roofline*: that speed as a "
        "share of what this machine's measured memory bandwidth allows for the bytes each token must read from memory "
        "(those the CPU cache cannot hold); *-* where no share can be trusted, for the reason below the chart.",
        markdown_table(COLUMNS, [[name, *(format_cell(k, row[k]) for k in KEYS)] for name, row in table.items()]),
        "![decode speed against file size, coloured by bits per byte](bench.png)",
        f"Bench: {bench_settings['prompt_tokens']}-token prompt, {bench_settings['new_tokens']} new tokens, "
        f"{bench_settings['repetitions']} repetitions, {machine['threads']} thread(s); memory bandwidth "
        f"{machine['bandwidth_gb_s']:.1f} GB/s (median; {machine['bandwidth_min_max'][0]:.1f}–"
        f"{machine['bandwidth_min_max'][1]:.1f} over the rounds). Details: `bench.json`.",
        *roofline_warnings(report["bench"]["models"]),
        "## Quantization",
        f"Static int8 against the float32 export, on held-out text: top-1 agreement {gate['top1_agreement']:.1%}, "
        f"bits per byte {gate['bits_per_byte_float']:.4f} → {gate['bits_per_byte']:.4f} "
        f"({gate['bits_per_byte_increase']:+.2%}).",
        *pretrained_section(report["pretrained"]),
        "## Continuations against the parent stage",
        "The same metrics with the parent stage's greedy continuation as the reference: how much of the parent's "
        "behaviour each stage keeps.",
        markdown_table(["stage", "vs", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "METEOR"],
                       [[s.name, s.parent, *(format_cell(k, evals[s.name]["all"]["vs_baseline"][k])
                                             for k in ("bleu", "rouge1", "rouge2", "rougeL", "meteor"))]
                        for s in stages if s.parent]),
        "## Samples from the package",
        "Through `spj_edge.runtime` (onnxruntime, numpy and tokenizers only), temperature 0.8, top-p 0.95, seed 0:",
        *(f"**{lang}**\n\n```text\n{text}\n```" for lang, text in report["samples"].items()),
        "## Reproduce",
        "```sh\n" + reproduce(report, out) + "\n```",
    ]
    return "\n\n".join(parts) + "\n"


def pretrained_section(pretrained: dict) -> list[str]:
    """REPORT.md's part on SmolLM2: its figures, or the one line that says why the demo left it out."""
    heading = "## A pretrained model: SmolLM2-135M-Instruct"
    if "skipped" in pretrained:
        return [heading, f"Not run: {pretrained['skipped']}."]
    seconds, sizes, gate = pretrained["seconds"], pretrained["file_bytes"], pretrained["gate"]
    speed, threads = pretrained["decode_tokens_per_s"], pretrained["decode_threads"]
    return [
        heading,
        f"`{pretrained['gguf']}` through `import`, `export` (opset 17), `quantize` (static int8, default options, "
        "calibrated and gated on the files above) and `package`, then one greedy chat reply from the package through "
        f"`spj_edge.runtime`; everything is in `{pretrained['folder']}`.",
        markdown_table(["step", *PRETRAINED_STEPS], [["seconds", *(f"{seconds[s]:.0f}" for s in PRETRAINED_STEPS)]]),
        markdown_table(["", "float32", "static int8"], [
            ["file MB", f"{sizes['float32'] / 1e6:.0f}", f"{sizes['static'] / 1e6:.0f} "
                                                          f"({sizes['static'] / sizes['float32']:.0%})"],
            ["bits per byte", f"{gate['bits_per_byte_float']:.4f}",
             f"{gate['bits_per_byte']:.4f} ({gate['bits_per_byte_increase']:+.2%})"],
            [f"decode tok/s ({threads} thread{'s' if threads > 1 else ''})", f"{speed['float32']:.0f}",
             f"{speed['static']:.0f}"]]),
        f"Top-1 agreement with float32 where it is confident ({gate['confident_share']:.0%} of the positions): "
        f"{gate['top1_agreement_confident']:.2%}; overall {gate['top1_agreement']:.2%}; KL(float32 ‖ int8) "
        f"{gate['kl']:.4f} nats a token. {len(pretrained['eight_bit'])} of {pretrained['matmuls']} weight MatMuls "
        "have 8-bit block weights (MatMulNBits), where static int8 would break their output or, on a VNNI CPU, all of "
        "them (the faster kernel there)" + (f", in blocks of {pretrained['eight_bit_block_size']}"
                                            if pretrained["eight_bit"] else "") + ":",
        "\n".join(f"- `{name}`: {why}" for name, why in pretrained["eight_bit"].items()) or "- none",
        f"{len(pretrained['kept_in_float'])} stayed float:",
        "\n".join(f"- `{name}`: {why}" for name, why in pretrained["kept_in_float"].items()) or "- none",
        f"**{pretrained['prompt']}**\n\n```text\n{pretrained['reply']}\n```",
    ]


def reproduce(report: dict, out: Path) -> str:
    """The commands that redo this report's figures, on the same held-out files."""
    heldout = " ".join(report["files"]["heldout"].values())
    return "\n".join([
        f"spj-edge demo --out {out} --data {report['data']}" + (" --quick" if report["quick"] else ""),
        f"spj-edge eval --model {out}/dist/model.spj --baseline {out}/onnx-fp32 --data {heldout}",
        f"spj-edge bench --model {out}/onnx-fp32 {out}/int8 {out}/dist/model.spj --chart {out}/bench.png",
    ])


def roofline_warnings(models: dict) -> list[str]:
    """Why a roofline cell is "-": one bullet a reason, under one heading line (none when every share is shown)."""
    reasons = sorted({row["roofline_warning"] for row in models.values() if row.get("roofline_warning")})
    return ["Where the roofline column shows *-*:\n\n" + "\n".join(f"- {reason}" for reason in reasons)] if reasons else []
