"""`spj-edge VERB ...`: argument parsing only; each verb calls one library function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ArgumentParser, run_command


def cmd_tokenizer(args):
    from .tokenizer import build_tokenizer

    build_tokenizer(args.data, args.vocab_size, Path(args.out), overwrite=args.overwrite)


def cmd_train(args):
    from .model import load_preset
    from .options import TrainOptions
    from .train import train

    opts = TrainOptions(**{k: getattr(args, k) for k in TRAIN_FLAGS})
    train(load_preset(args.preset), args.data, args.out, opts, tokenizer=args.tokenizer, val_data=args.val_data,
          resume=args.resume, overwrite=args.overwrite)


def cmd_distill(args):
    from .distill import distill
    from .options import TrainOptions

    opts = TrainOptions(**{k: getattr(args, k) for k in TRAIN_FLAGS})
    distill(args.teacher, args.out, preset=args.preset, student_dir=args.student, data=args.data, opts=opts,
            temperature=args.temperature, alpha=args.alpha, val_data=args.val_data, resume=args.resume,
            overwrite=args.overwrite)


def cmd_prune(args):
    from .prune import prune

    prune(args.model, args.out, ffn_ratio=args.ffn_ratio, head_ratio=args.head_ratio, importance=args.importance,
          calib=args.calib, method=args.method, multiple=args.multiple, overwrite=args.overwrite)


def cmd_generate(args):
    from .generate import generate_text

    generate_text(args.model, args.prompt, args.max_new_tokens, sampling_params(args), args.ignore_eos, sys.stdout)


def cmd_export(args):
    from .export import export

    export(args.model, args.out, opset=args.opset, fuse=args.fuse, overwrite=args.overwrite)


def cmd_quantize(args):
    from .quantize import quantize

    quantize(args.model, args.out, calib=args.calib, mode=args.mode, target=args.target,
             calib_samples=args.calib_samples, calibration=args.calibration, per_channel=args.per_channel,
             exclude=tuple(args.exclude), auto_exclude=args.auto_exclude, eval_data=args.eval,
             max_bpb_increase=args.max_bpb_increase, min_agreement=args.min_agreement, block_size=args.block_size,
             accuracy_level=args.accuracy_level, smoothquant=args.smoothquant, force=args.force,
             overwrite=args.overwrite)


def cmd_package(args):
    from .package import package

    package(args.model, args.out, tar=args.tar, overwrite=args.overwrite)


def cmd_eval(args):
    from .evaluate import evaluate

    evaluate(args.model, args.data, baseline=args.baseline, json_out=args.json, windows=args.windows,
             prompts=args.prompts, new_tokens=args.new_tokens)


def cmd_bench(args):
    from .bench import bench

    bench(args.model, torch_checkpoints=args.torch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
          repetitions=args.repetitions, threads=args.threads, json_out=args.json, chart=args.chart)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(data=args.data, out=args.out, quick=args.quick, overwrite=args.overwrite)


def sampling_params(args):
    from .sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


TRAIN_FLAGS = ("steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "grad_clip", "precision",
               "seed", "eval_every", "eval_windows", "save_every", "val_fraction", "compile")


def add_training_flags(p: argparse.ArgumentParser):
    from .options import PRECISIONS, TrainOptions

    d = TrainOptions()
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or directories (recursive)")
    p.add_argument("--val-data", nargs="+", metavar="PATH", help="held-out text (default: a seeded split of --data)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 where the CPU or GPU has it, fp16 on older GPUs, else fp32")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=d.eval_windows, help="held-out windows per evaluation")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: at the end)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--compile", action="store_true", help="torch.compile the model: slow start, faster steps")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def add_sampling_flags(p: argparse.ArgumentParser):
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="spj-edge", description="Train, distill, prune, export, quantize, package, evaluate "
                                                         "and benchmark small Llama-style models for CPUs and the "
                                                         "Raspberry Pi.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", default="runs/tokenizer.json")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_tokenizer)

    p = verbs.add_parser("train", help="train a model from scratch (also under torchrun)")
    p.add_argument("--preset", default="teacher", help="a preset name or JSON file (models/*.json)")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: train one on --data)")
    p.add_argument("--out", default="runs/teacher")
    add_training_flags(p)
    p.set_defaults(run=cmd_train)

    p = verbs.add_parser("distill", help="distill a teacher into a student by its logits (also under torchrun)")
    p.add_argument("--teacher", default="runs/teacher", help="teacher checkpoint directory")
    p.add_argument("--preset", help="a new student of this preset (name or models/*.json); or give --student")
    p.add_argument("--student", help="start from this checkpoint instead, e.g. a pruned teacher")
    p.add_argument("--temperature", type=float, default=1.0, help="softens both distributions (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="weight of cross-entropy on the data, the rest on KL to the teacher (default %(default)s)")
    p.add_argument("--out", default="runs/student")
    add_training_flags(p)
    p.set_defaults(run=cmd_distill)

    p = verbs.add_parser("prune", help="structured pruning: remove FFN channels and attention heads")
    p.add_argument("--model", default="runs/teacher", help="checkpoint directory")
    p.add_argument("--ffn-ratio", type=float, required=True, help="fraction of FFN channels to remove, in [0, 1)")
    p.add_argument("--head-ratio", type=float, default=0.0, help="fraction of query heads to remove in each KV group")
    p.add_argument("--importance", default="activation",
                   help="activation: mean |activation| on --calib text (default); l1: weight norms")
    p.add_argument("--calib", nargs="+", metavar="PATH", help="calibration text; a tenth is held out to measure on")
    p.add_argument("--method", default="structured",
                   help="structured (default), or magnitude: unstructured zeros, for comparison; shrinks nothing")
    p.add_argument("--multiple", type=int, default=16, help="round the FFN width up to a multiple of this")
    p.add_argument("--out", default="runs/pruned")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_prune)

    p = verbs.add_parser("generate", help="generate text with a checkpoint in PyTorch (the reference)")
    p.add_argument("--model", default="runs/teacher", help="checkpoint directory")
    p.add_argument("--prompt", required=True)
    add_sampling_flags(p)
    p.set_defaults(run=cmd_generate)

    p = verbs.add_parser("export", help="export a checkpoint to ONNX with a KV cache, verified against PyTorch")
    p.add_argument("--model", help="checkpoint directory, ours or any local Hugging Face LlamaForCausalLM "
                                   "(default: runs/student, else runs/teacher)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset: 14-21 for the fused graph, 14-20 for the plain one (default %(default)s)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="emit ONNX Runtime's fused ops (the default); --no-fuse traces a plain standard-ops graph")
    p.add_argument("--out", default="runs/onnx")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_export)

    p = verbs.add_parser("quantize", help="int8 (static with calibration, or dynamic) or int4, behind an accuracy gate")
    p.add_argument("--model", default="runs/onnx", help="a float export directory (default %(default)s)")
    p.add_argument("--calib", nargs="+", metavar="PATH", help="calibration text; its last 20%% is held out for the "
                                                             "gate unless --eval is given")
    p.add_argument("--out", help="default: runs/int8, or runs/int4 with --mode int4")
    p.add_argument("--mode", choices=("static", "dynamic", "int4"), default="static")
    p.add_argument("--target", default="auto", help="a profile in exporters/: x86-vnni, x86, arm64 (default: this CPU)")
    p.add_argument("--calib-samples", type=int, default=32,
                   help="calibration samples, each a 32-token prefill and 16 cached decode steps")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), help="default: the profile's")
    p.add_argument("--per-channel", action=argparse.BooleanOptionalAction, default=None,
                   help="per-channel weight scales (default: the profile's)")
    p.add_argument("--smoothquant", type=float, metavar="ALPHA", help="static: fold SmoothQuant scales (alpha, e.g. 0.5) "
                                                                        "from each RMSNorm into the MatMul after it")
    p.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="keep these MatMuls in float, e.g. "
                                                                             "/lm_head/MatMul")
    p.add_argument("--auto-exclude", action="store_true", help="keep the most sensitive MatMuls in float until the "
                                                               "gate passes")
    p.add_argument("--eval", nargs="+", metavar="PATH", help="held-out text for the gate")
    p.add_argument("--max-bpb-increase", type=float, default=0.02, help="gate: relative (default 0.02 = 2%%)")
    p.add_argument("--min-agreement", type=float, default=0.95, help="gate: top-1 agreement with float32")
    p.add_argument("--block-size", type=int, default=32, help="int4: weights per scale")
    p.add_argument("--accuracy-level", type=int, default=4, help="int4: MatMulNBits compute type (4: int8)")
    p.add_argument("--force", action="store_true", help="write a model that fails the gate, with a warning")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_quantize)

    p = verbs.add_parser("package", help="bundle an exported or quantized model for the device: model.onnx, "
                                         "tokenizer.json and the spj.json manifest")
    p.add_argument("--model", default="runs/onnx", help="an export or quantize output directory (default %(default)s)")
    p.add_argument("--out", default="dist/model.spj", help="the package directory (default %(default)s)")
    p.add_argument("--tar", action="store_true", help="write OUT.tar.gz, one file to copy, instead of the directory")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_package)

    p = verbs.add_parser("eval", help="bits per byte per language, agreement with a baseline, BLEU/ROUGE/METEOR of "
                                      "greedy continuations")
    p.add_argument("--model", required=True, help="a checkpoint, an ONNX export directory or a package")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="held-out text files or directories")
    p.add_argument("--baseline", help="a second model (any kind) to compare with: top-1 agreement, continuations")
    p.add_argument("--windows", type=int, default=32, help="scored windows per file, spread evenly (default %(default)s)")
    p.add_argument("--prompts", type=int, default=16, help="held-out prompts per file to continue (default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per greedy continuation (default %(default)s)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.set_defaults(run=cmd_eval)

    p = verbs.add_parser("bench", help="decode speed, prompt time, peak memory, size and the memory-bandwidth bound")
    p.add_argument("--model", nargs="+", action="extend", default=[], metavar="PATH",
                   help="ONNX export directories or packages (repeatable)")
    p.add_argument("--torch", nargs="+", action="extend", default=[], metavar="CKPT",
                   help="checkpoints to time in PyTorch as well")
    p.add_argument("--prompt-tokens", type=int, default=32, help="random prompt ids, fresh each repetition "
                                                                 "(default %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy new tokens, EOS ignored (default %(default)s)")
    p.add_argument("--repetitions", type=int, default=5, help="interleaved across the models (default %(default)s)")
    p.add_argument("--threads", type=int, help="onnxruntime and torch threads (default: the runtime's choice)")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--chart", metavar="PNG", help="also draw speed against size (and quality, with eval figures)")
    p.set_defaults(run=cmd_bench)

    p = verbs.add_parser("demo", help="the whole path on ../shared/data, with a report")
    p.add_argument("--data", help="a directory laid out like ../shared/data (default: ../shared/data if present)")
    p.add_argument("--out", help="default: runs/demo, or runs/demo-quick with --quick")
    p.add_argument("--quick", action="store_true", help="tiny models, the same path: about QUICK_TIME on 2 cores")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it holds a run of the other mode "
                                                            "or files that are no demo's")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
