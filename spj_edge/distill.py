"""Knowledge distillation: a student learns the teacher's next-token distributions (forward KL on logits, as in
DistilGPT2 and Minitron), optionally mixed with plain cross-entropy on the data.

    loss = alpha · CE(student, data) + (1 − alpha) · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

The T² keeps the gradient's scale independent of the temperature (Hinton et al., 2015). The student trains in
`train.fit`, so mixed precision, gradient accumulation, resume, torchrun and the report are train's; the teacher runs
in eval mode under no_grad on the same device, and under DDP only the student is wrapped.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from .checkpoint import checkpoint_sha256, load_checkpoint, load_model
from .data import tokenizer_sha256
from .errors import SPJError
from .metrics import top1_agreement
from .config import load_preset
from .model import Transformer
from .artifact import read_json
from .outputs import check_output, write_json
from .tokenizer import load_tokenizer, special_token_ids, token_byte_lengths
from .tables import print_summary
from .options import SourceOptions
from .train import (Processes, TrainOptions, autocast_dtype, check_resumable, fit, heldout_metrics, load_dataset,
                    read_training_text)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the temperature-softened distributions, averaged over positions. In float32:
    under bf16 autocast the log-softmax of a 4096-way distribution loses the small probabilities KL is made of."""
    student = F.log_softmax(student_logits.float().flatten(0, -2) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature ** 2


def distillation_loss(teacher: Transformer, temperature: float, alpha: float):
    """A `loss_fn` for `train.fit`: the student's loss against the teacher (and, weighted by alpha, the data)."""
    teacher.eval().requires_grad_(False)

    def loss_fn(student, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits, _ = teacher(inputs)
        student_logits, _ = student(inputs)
        loss = kd_loss(student_logits, teacher_logits, temperature)
        if alpha:
            loss = (1 - alpha) * loss + alpha * F.cross_entropy(student_logits.flatten(0, 1).float(), targets.flatten())
        return loss

    return loss_fn


@torch.no_grad()
def agreement_with_teacher(student: Transformer, teacher: Transformer, windows: np.ndarray, batch_size: int,
                           amp_dtype: torch.dtype | None = None) -> dict:
    """On held-out windows: KL(teacher ‖ student) in nats per token at temperature 1, and how often the two agree on
    the most likely next token."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    kl, tokens, top1, teacher_top1 = 0.0, 0, [], []
    for start in range(0, len(windows), batch_size):
        inputs = torch.from_numpy(windows[start:start + batch_size, :-1]).to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            student_logits, _ = student(inputs)
            teacher_logits, _ = teacher(inputs)
        kl += kd_loss(student_logits, teacher_logits, 1.0).item() * inputs.numel()
        top1.append(student_logits.argmax(-1).flatten().cpu().numpy())
        teacher_top1.append(teacher_logits.argmax(-1).flatten().cpu().numpy())
        tokens += inputs.numel()
    student.train(was_training)
    return {"kl_to_teacher": kl / tokens, "top1_agreement": top1_agreement(np.concatenate(top1),
                                                                             np.concatenate(teacher_top1)),
            "tokens": tokens}


def distill(teacher_dir: str | Path, out: str | Path | None, *, preset: str | Path | None = None,
            student_dir: str | Path | None = None, data: list, opts: TrainOptions = TrainOptions(),
            temperature: float = 1.0, alpha: float = 0.0, val_data: list | None = None,
            sources: SourceOptions = SourceOptions(), resume: bool = False,
            overwrite: bool = False) -> tuple[Transformer, Tokenizer, dict]:
    """Distill the teacher checkpoint into a new student of `preset`, or into the checkpoint `student_dir` (a pruned
    teacher, say), or resume the run saved in `out`."""
    if (preset is None) == (student_dir is None):
        raise SPJError("distill: give the student as exactly one of --preset (a new model) or --student (a checkpoint)")
    if not (temperature > 0 and np.isfinite(temperature)):
        raise SPJError(f"--temperature must be a positive number, got {temperature}")
    if not 0 <= alpha <= 1:
        raise SPJError(f"--alpha must be in [0, 1] (the weight of cross-entropy on the data), got {alpha}")
    out = Path(out) if out is not None else None
    teacher_dir = Path(teacher_dir)
    procs = Processes.start()
    if resume:
        check_resumable(out)
    if out is not None:
        check_output(out, [teacher_dir, student_dir, *data, *(val_data or [])], overwrite=overwrite, resume=resume)
    procs.barrier()  # every rank has looked at `out` before rank 0 may write it

    teacher, tokenizer = load_checkpoint(teacher_dir)
    if resume:
        student, student_tokenizer, source = load_model(out), load_tokenizer(out / "tokenizer.json"), out
    elif student_dir is not None:
        (student, student_tokenizer), source = load_checkpoint(student_dir), student_dir
    else:
        torch.manual_seed(opts.seed)
        config = load_preset(preset).replace(**special_token_ids(tokenizer))
        student, student_tokenizer, source = Transformer(config), tokenizer, preset
    if tokenizer_sha256(student_tokenizer) != tokenizer_sha256(tokenizer):
        raise SPJError(f"{source}: the student's tokenizer differs from the teacher's ({teacher_dir}); distillation "
                       "compares their next-token distributions id by id, so both must use one tokenizer")
    student_cfg, teacher_cfg = student.config, teacher.config
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise SPJError(f"{source}: the student's vocabulary has {student_cfg.vocab_size} entries, the teacher's "
                       f"{teacher_cfg.vocab_size}: their logits cannot be compared")
    if student_cfg.max_position_embeddings > teacher_cfg.max_position_embeddings:
        raise SPJError(f"{source}: the student's context ({student_cfg.max_position_embeddings}) is longer than the "
                       f"teacher's ({teacher_cfg.max_position_embeddings})")
    settings = {"teacher": str(teacher_dir), "teacher_sha256": checkpoint_sha256(teacher_dir),
                "student_init": str(preset if preset is not None else student_dir), "temperature": temperature,
                "alpha": alpha}
    if resume:
        saved = read_json(out / "report.json").get("distillation", {})
        changed = [k for k in ("teacher_sha256", "temperature", "alpha") if saved.get(k) != settings[k]]
        if changed:
            raise SPJError(f"{out}: cannot resume with different settings ({', '.join(changed)} changed)")

    documents, bad_records = read_training_text(data, sources, procs)
    dataset = load_dataset(data, tokenizer, student_cfg.max_position_embeddings, opts, val_data, sources, documents)
    teacher.to(procs.device)
    report_extra = {"data": [str(p) for p in data], "val_data": [str(p) for p in val_data or []],
                    "tokenizer_vocab_size": tokenizer.get_vocab_size(), "bad_records": bad_records,
                    "distillation": settings}
    report = fit(student, tokenizer, dataset, opts, out, procs, loss_fn=distillation_loss(teacher, temperature, alpha),
                 resume=resume, stage="distill", report_extra=report_extra)

    # `fit` has written the checkpoint already; the comparison with the teacher joins its report.json afterwards
    # (a held-out hook in `fit` would put it into the same atomic write and into every evaluation of the history).
    if procs.main:
        amp_dtype = autocast_dtype(opts.precision, procs.device)
        val_windows = dataset.val[: opts.eval_windows]
        byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer, teacher_cfg.vocab_size))
        heldout = agreement_with_teacher(student, teacher, val_windows, opts.batch_size, amp_dtype)
        heldout["teacher_bits_per_byte"] = heldout_metrics(teacher, val_windows, byte_lengths, opts.batch_size,
                                                           amp_dtype)["bits_per_byte"]
        report["distillation"] = {**settings, "heldout": heldout}
        if out is not None:
            write_json(out / "report.json", report)
        print_summary(f"distill: {teacher_dir} → {out or 'in memory'}, held out", [
            ("KL to the teacher", f"{heldout['kl_to_teacher']:.4f} nats/token"),
            ("top-1 agreement", f"{heldout['top1_agreement']:.1%}"),
            ("bits per byte", report["heldout"]["bits_per_byte"]),
            ("teacher's bits per byte", heldout["teacher_bits_per_byte"])])
    return student, tokenizer, report
