"""The options of the training loop as data, without torch: the CLI builds its flags and defaults from them, and a
runtime-only install (no torch) can still parse `spj-edge --help`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import SPJError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr × this
    warmup_steps: int = -1  # -1: 5 % of the steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    seed: int = 1337
    eval_every: int = 100
    eval_windows: int = 64  # held-out windows per validation
    save_every: int = 0  # 0: only at the end
    val_fraction: float = 0.05
    compile: bool = False  # torch.compile the training step: ~40 s to compile, then ~1.5× the tokens/s on a CPU

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows"):
            if getattr(self, name) <= 0:
                raise SPJError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SPJError(f"--lr must be a positive number, got {self.lr}")
        if self.save_every < 0:
            raise SPJError(f"--save-every must be ≥ 0, got {self.save_every}")
        if self.warmup_steps < -1:
            raise SPJError(f"--warmup-steps must be ≥ 0 (or -1: 5 % of the steps), got {self.warmup_steps}")
        # A negative clip would flip the gradient's sign, a NaN decay turn every weight into NaN: refuse, don't train.
        if not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise SPJError(f"--grad-clip must be a positive number, got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SPJError(f"--weight-decay must be a number ≥ 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SPJError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seed < 0:  # numpy's seeded permutations refuse negative seeds, with a bare ValueError
            raise SPJError(f"--seed must be an integer ≥ 0, got {self.seed}")
        if not 0 < self.val_fraction < 1:
            raise SPJError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise SPJError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else max(1, self.steps // 20)

