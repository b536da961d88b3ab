"""`spj-edge VERB ...`: argument parsing only; each verb calls one library function."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import ArgumentParser, run_command
from .options import (CALIB_HELD_OUT, IMPORT_DTYPES, BenchOptions, EvalOptions, PackageOptions, PrepareOptions,
                      PruneOptions, QuantizeOptions, SourceOptions, TrainOptions, add_flags, from_flags)


def cmd_tokenizer(args):
    from .tokenizer_stage import build_tokenizer

    build_tokenizer(args.data, args.vocab_size, Path(args.out), overwrite=args.overwrite)


def cmd_prepare(args):
    from .prepare import prepare

    prepare(args.data, args.tokenizer, args.out, from_flags(PrepareOptions, args), from_flags(SourceOptions, args),
            overwrite=args.overwrite)


def cmd_train(args):
    from .config import load_preset
    from .train import train

    opts = from_flags(TrainOptions, args)
    train(load_preset(args.preset), args.data, args.out, opts, tokenizer=args.tokenizer, val_data=args.val_data,
          sources=from_flags(SourceOptions, args), resume=args.resume, overwrite=args.overwrite)


def cmd_distill(args):
    from .distill import distill

    opts = from_flags(TrainOptions, args)
    distill(args.teacher, args.out, preset=args.preset, student_dir=args.student, data=args.data, opts=opts,
            temperature=args.temperature, alpha=args.alpha, val_data=args.val_data,
            sources=from_flags(SourceOptions, args), resume=args.resume, overwrite=args.overwrite)


def cmd_prune(args):
    from .prune import prune

    prune(args.model, args.out, calib=args.calib, options=from_flags(PruneOptions, args), overwrite=args.overwrite)


def cmd_generate(args):
    from .generate import generate_text

    chosen = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    generate_text(args.model, args.prompt, chosen, args.seed, args.ignore_eos, sys.stdout)


def cmd_import(args):
    from .import_gguf import import_gguf

    import_gguf(args.gguf, args.out, dtype=args.dtype, overwrite=args.overwrite)


def cmd_export(args):
    from .export import export

    export(args.model, args.out, opset=args.opset, fuse=args.fuse, overwrite=args.overwrite,
           external_data=args.external_data)


def cmd_quantize(args):
    from .quantize import quantize

    quantize(args.model, args.out, calib=args.calib, eval_data=args.eval, options=from_flags(QuantizeOptions, args),
             overwrite=args.overwrite)


def cmd_package(args):
    from .package import package

    package(args.model, args.out, options=from_flags(PackageOptions, args), overwrite=args.overwrite)


def cmd_eval(args):
    from .evaluate import evaluate

    evaluate(args.model, args.data, baseline=args.baseline, json_out=args.json,
             options=from_flags(EvalOptions, args))


def cmd_bench(args):
    from .bench import bench

    bench(args.model, torch_checkpoints=args.torch, options=from_flags(BenchOptions, args), json_out=args.json,
          chart=args.chart)


def cmd_serve(args):
    from .runtime.serve import ServeOptions, serve

    serve(from_flags(ServeOptions, args))


def cmd_demo(args):
    from .demo import run_demo

    run_demo(data=args.data, out=args.out, quick=args.quick, overwrite=args.overwrite)


def add_training_flags(p: argparse.ArgumentParser):
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=f"a directory `spj-edge prepare` wrote, or {DATA_HELP}, tokenized in memory")
    p.add_argument("--val-data", nargs="+", metavar="PATH", help="held-out text (default: a seeded split of --data, "
                                                                 "or a prepared directory's held-out documents)")
    add_flags(p, TrainOptions)
    add_flags(p, SourceOptions)
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


DATA_HELP = "text, .jsonl, .jsonl.zst, .jsonl.gz, .json.gz or .parquet files, or directories of them"

SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


def add_sampling_flags(p: argparse.ArgumentParser):
    """Each unset flag takes the model's default (its generation_config.json), else sampling.GENERATION_DEFAULTS."""
    from .sampling import GENERATION_DEFAULTS as d

    def default(name: str) -> str:
        return f"default: the model's generation_config.json, else {d[name]}"

    p.add_argument("--max-new-tokens", type=int, help=default("max_new_tokens"))
    p.add_argument("--temperature", type=float, help=f"0: greedy ({default('temperature')})")
    p.add_argument("--top-k", type=int, help=f"0: no limit ({default('top_k')})")
    p.add_argument("--top-p", type=float, help=default("top_p"))
    p.add_argument("--repetition-penalty", type=float, help=default("repetition_penalty"))
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

    p = verbs.add_parser("prepare", help="tokenize a corpus once into token shards that train and distill "
                                         "memory-map (deterministic, resumable)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help=DATA_HELP)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json (train and distill must use the same)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_flags(p, PrepareOptions)
    add_flags(p, SourceOptions)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=cmd_prepare)

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
    add_flags(p, PruneOptions)
    p.add_argument("--calib", nargs="+", metavar="PATH", help=f"calibration text; the last {CALIB_HELD_OUT:.0%}% of "
                                                             "each file is held out to measure on")
    p.add_argument("--out", default="runs/pruned")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_prune)

    p = verbs.add_parser("generate", help="generate text with a checkpoint in PyTorch (the reference)")
    p.add_argument("--model", default="runs/teacher", help="checkpoint directory")
    p.add_argument("--prompt", required=True)
    add_sampling_flags(p)
    p.set_defaults(run=cmd_generate)

    p = verbs.add_parser("import", help="a pretrained llama.cpp GGUF Llama → a checkpoint (Hugging Face's layout, "
                                        "with its tokenizer, chat template and end-of-generation ids)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="a .gguf file of architecture llama")
    p.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint directory to write")
    p.add_argument("--dtype", default=IMPORT_DTYPES[0], choices=IMPORT_DTYPES,
                   help="of the dequantized weights (default %(default)s; bfloat16 halves the file and rounds them)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_import)

    p = verbs.add_parser("export", help="export a checkpoint to ONNX with a KV cache, verified against PyTorch")
    p.add_argument("--model", help="checkpoint directory, ours or any local Hugging Face LlamaForCausalLM "
                                   "(default: runs/student, else runs/teacher)")
    p.add_argument("--opset", type=int, default=17,
                   help="ONNX opset: 14-21 for the fused graph, 14-20 for the plain one (default %(default)s)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="emit ONNX Runtime's fused ops (the default); --no-fuse traces a plain standard-ops graph")
    p.add_argument("--external-data", action=argparse.BooleanOptionalAction, default=None,
                   help="the weights in model.onnx.data beside the graph (default: when the graph passes 1 GiB; "
                        "protobuf cannot hold 2 GiB in one file)")
    p.add_argument("--out", default="runs/onnx")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_export)

    p = verbs.add_parser("quantize", help="int8 (static with calibration, or dynamic) or int4, behind an accuracy gate")
    p.add_argument("--model", default="runs/onnx", help="a float export directory (default %(default)s)")
    p.add_argument("--calib", nargs="+", metavar="PATH", help=f"calibration text; the last {CALIB_HELD_OUT:.0%}% of "
                                                             "each file is held out for the gate unless --eval is given")
    p.add_argument("--out", help="default: runs/int8, or runs/int4 with --mode int4")
    add_flags(p, QuantizeOptions)
    p.add_argument("--eval", nargs="+", metavar="PATH", help="held-out text for the gate")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_quantize)

    p = verbs.add_parser("package", help="bundle an exported or quantized model for the device: model.onnx, "
                                         "tokenizer.json and the spj.json manifest")
    p.add_argument("--model", default="runs/onnx", help="an export or quantize output directory (default %(default)s)")
    p.add_argument("--out", default="dist/model.spj", help="the package directory (default %(default)s)")
    add_flags(p, PackageOptions)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_package)

    p = verbs.add_parser("eval", help="bits per byte per language, agreement with a baseline, BLEU/ROUGE/METEOR of "
                                      "greedy continuations")
    p.add_argument("--model", required=True, help="a checkpoint, an ONNX export directory or a package")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="held-out text files or directories")
    p.add_argument("--baseline", help="a second model (any kind) to compare with: top-1 agreement, continuations")
    add_flags(p, EvalOptions)
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.set_defaults(run=cmd_eval)

    p = verbs.add_parser("bench", help="decode speed, prompt time, peak memory, size and the memory-bandwidth bound")
    p.add_argument("--model", nargs="+", action="extend", default=[], metavar="PATH",
                   help="ONNX export directories or packages (repeatable)")
    p.add_argument("--torch", nargs="+", action="extend", default=[], metavar="CKPT",
                   help="checkpoints to time in PyTorch as well")
    add_flags(p, BenchOptions)
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    p.add_argument("--chart", metavar="PNG", help="also draw speed against size (and quality, with eval figures)")
    p.set_defaults(run=cmd_bench)

    from .runtime.serve import ServeOptions  # torch-free: the runtime-only install serves too

    p = verbs.add_parser("serve", help="keep a package loaded behind an OpenAI-compatible HTTP API (completions, "
                                       "chat, streaming; requests batched together)")
    add_flags(p, ServeOptions)
    p.set_defaults(run=cmd_serve)

    p = verbs.add_parser("demo", help="the whole path on ../shared/data, then SmolLM2 from ../shared/models to a "
                                     "chat reply, with a report")
    p.add_argument("--data", help="a directory laid out like ../shared/data (default: ../shared/data if present); "
                                  "the GGUF comes from the models/ folder beside it")
    p.add_argument("--out", help="default: runs/demo, or runs/demo-quick with --quick")
    p.add_argument("--quick", action="store_true", help="tiny models, the same path, and no pretrained SmolLM2 "
                                                         "stage: about 1 min on 2 cores")
    p.add_argument("--overwrite", action="store_true", help="fill --out even if it holds a finished run of the other "
                                                            "mode (never a folder spj-edge did not write)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
