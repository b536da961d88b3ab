"""Distillation and structured pruning on tinyshakespeare: the two targets of issue 6.

    .venv/bin/python benchmarks/distill_prune.py [--teacher runs/teacher] [--teacher-steps 400 ...]

1. At equal steps and data, a `student` distilled from the `teacher` against the same student trained from
   scratch: held-out bits per byte on val.txt. Distilled twice: logits only (alpha 0, Minitron) and half
   cross-entropy on the data (alpha 0.5, in the spirit of DistilGPT2's mixed loss).
2. The teacher with half its FFN channels pruned (activation importance on train.txt), then distilled from the
   unpruned teacher by logits only: its bits per byte against the teacher's (target: within 5 %), and the decode
   speed of the two fused ONNX graphs (target: ≥ 1.3×). An unstructured (magnitude) pruning of the same half is timed
   too, as the control.

Decode speed is tokens/s at batch 1 for 128 tokens after a 32-token prompt, median over repetitions that alternate
between the graphs (spj_edge.onnx_lm.measure_speed). Prints one JSON object; the checkpoints stay in --out.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from spj_edge.checkpoint import load_model
from spj_edge.config import load_preset
from spj_edge.distill import distill
from spj_edge.export import export
from spj_edge.onnx_lm import measure_speed
from spj_edge.options import PruneOptions
from spj_edge.prune import prune
from spj_edge.train import TrainOptions, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "corpus" / "tinyshakespeare"


def bits_per_byte(report: dict) -> float:
    return round(report["heldout"]["bits_per_byte"], 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DATA, help="a directory with train.txt and val.txt")
    ap.add_argument("--out", type=Path, default=Path("runs/distill_prune"))
    ap.add_argument("--teacher", type=Path, help="a trained teacher checkpoint (default: train one here)")
    # The students get far fewer steps than the teacher: a distilled student can only beat one trained from scratch
    # while the teacher knows more than the scratch student can learn by itself in the same steps.
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--student-steps", type=int, default=150)
    ap.add_argument("--recover-steps", type=int, default=100, help="distillation steps after pruning")
    ap.add_argument("--recover-lr", type=float, default=1e-3, help="lower than from scratch: the weights are trained")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5], help="one distilled student for each")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the decode timing")
    ap.add_argument("--repetitions", type=int, default=15)
    args = ap.parse_args()
    started = time.perf_counter()
    data, val = [args.data / "train.txt"], [args.data / "val.txt"]
    out = args.out

    def options(steps: int, **changes) -> TrainOptions:
        return TrainOptions(steps=steps, batch_size=args.batch_size, eval_every=steps, eval_windows=10_000, **changes)

    teacher = args.teacher
    if teacher is None:
        teacher = out / "teacher"
        train(load_preset("teacher"), data, teacher, options(args.teacher_steps), val_data=val, overwrite=True)
    tokenizer = teacher / "tokenizer.json"

    # 1. the student, from scratch and distilled, at equal steps and data
    _, _, scratch = train(load_preset("student"), data, out / "student_scratch", options(args.student_steps),
                          tokenizer=tokenizer, val_data=val, overwrite=True)
    distilled = {}
    for alpha in args.alphas:
        _, _, distilled[alpha] = distill(teacher, out / f"student_distilled_alpha{alpha}", preset="student", data=data,
                                         val_data=val, opts=options(args.student_steps), temperature=args.temperature,
                                         alpha=alpha, overwrite=True)

    # 2. half the teacher's FFN, pruned, then recovered by distillation; and the unstructured control
    pruned = prune(teacher, out / "teacher_ffn50", calib=data, options=PruneOptions(ffn_ratio=0.5), overwrite=True)
    _, _, recovered = distill(teacher, out / "teacher_ffn50_distilled", student_dir=out / "teacher_ffn50", data=data,
                              val_data=val, opts=options(args.recover_steps, lr=args.recover_lr),
                              temperature=args.temperature, overwrite=True)
    sparse = prune(teacher, out / "teacher_magnitude50", options=PruneOptions(ffn_ratio=0.5, method="magnitude"),
                   overwrite=True)
    graphs = {}
    for name, checkpoint in (("teacher", teacher), ("pruned_distilled", out / "teacher_ffn50_distilled"),
                             ("magnitude", out / "teacher_magnitude50")):
        export(checkpoint, out / f"{name}_onnx", overwrite=True)  # the fused graph, verified against PyTorch
        graphs[name] = out / f"{name}_onnx" / "model.onnx"
    # FFN pruning leaves the graph's inputs and outputs (KV heads, head size, layers) as the teacher's: one config
    measured = measure_speed(graphs, load_model(teacher).config, new_tokens=128, repetitions=args.repetitions,
                             threads=args.threads)
    speeds = {name: round(m["decode_tokens_per_s"], 1) for name, m in measured.items()}
    file_mb = {name: round(path.stat().st_size / 1e6, 2) for name, path in graphs.items()}

    # the teacher measured on the same held-out windows as the students, by the distillation's report
    teacher_bpb = round(recovered["distillation"]["heldout"]["teacher_bits_per_byte"], 4)
    recovered_bpb = bits_per_byte(recovered)
    print(json.dumps({
        "data": str(args.data), "batch_size": args.batch_size, "temperature": args.temperature,
        "teacher": {"checkpoint": str(teacher), "parameters": pruned["parameters"]["before"],
                    "bits_per_byte": teacher_bpb},
        "student": {"steps": args.student_steps, "parameters": scratch["parameters"],
                    "scratch_bits_per_byte": bits_per_byte(scratch),
                    "distilled": [{"alpha": alpha, "bits_per_byte": bits_per_byte(report),
                                   "kl_to_teacher": round(report["distillation"]["heldout"]["kl_to_teacher"], 4),
                                   "target_beats_scratch": bits_per_byte(report) < bits_per_byte(scratch)}
                                  for alpha, report in distilled.items()]},
        "pruned": {"ffn": pruned["removed"]["intermediate_size"], "parameters": pruned["parameters"]["after"],
                   # prune measures on a held-out tenth of its calibration text (train.txt), not on val.txt
                   "calib_heldout_bits_per_byte": {k: round(v["bits_per_byte"], 4)
                                                   for k, v in pruned["heldout"].items()},
                   "recover_steps": args.recover_steps, "bits_per_byte_after_distilling": recovered_bpb,
                   "gap_to_teacher": round(recovered_bpb / teacher_bpb - 1, 4),
                   "target_within_5_percent": recovered_bpb <= 1.05 * teacher_bpb},
        "decode_tokens_per_s": speeds, "onnx_file_mb": file_mb, "threads": args.threads,
        "speedup_pruned": round(speeds["pruned_distilled"] / speeds["teacher"], 2),
        "speedup_magnitude": round(speeds["magnitude"] / speeds["teacher"], 2),
        "target_speedup_1_3": speeds["pruned_distilled"] >= 1.3 * speeds["teacher"],
        "magnitude_parameters_nonzero": sparse["parameters"]["nonzero_after"],
        "wall_s": round(time.perf_counter() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
