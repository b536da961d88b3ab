"""The gradients that the first optimizer step is handed, for tests that compare two ways of computing them.

Tests compare gradients, not the weights after AdamW: its first update is lr * g / (|g| + eps), i.e. lr * sign(g) for
any |g| >> eps, so a last-bit rounding difference in a near-zero gradient element flips a whole step of lr (one CPU's
summation order passes, another's fails); and AdamW's update barely depends on the gradient's scale, so comparing weights
would not catch an accumulation that sums where it should average.

`python tests/grad_probe.py OUT.safetensors VERB ...` runs `spj-edge VERB ...` (also under torchrun) and saves rank 0's
first-step gradients to OUT.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


@contextlib.contextmanager
def first_step_gradients():
    """Yields a list that holds, once an optimizer has stepped, each of its parameters' gradient, in group order."""
    captured: list[torch.Tensor] = []

    def record(optimizer, args, kwargs):
        if not captured:
            captured.extend(p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"])

    handle = register_optimizer_step_pre_hook(record)
    try:
        yield captured
    finally:
        handle.remove()


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters in float64."""
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    diff = torch.cat([(x.double() - y.double()).flatten() for x, y in zip(a, b)])
    return (diff.norm() / torch.cat([y.double().flatten() for y in b]).norm()).item()


# Where summation order alone separates two gradients. Each gradient element is a float32 sum of per-token terms
# (batch x sequence = 8 x 64 here, and matmul reductions over the hidden size); a reordering changes each partial sum
# by a few units of float32 rounding (2**-24 ≈ 6e-8), and these errors are independent across the ~1e5 elements, so
# the norm-wise relative difference grows like sqrt(reduction length) * 6e-8: about 1e-6 for reductions of a few
# hundred terms. 1e-4 leaves two orders of magnitude for any CPU's order and blocking (AVX-512, AVX2, NEON) while
# staying far below what a real change of the data makes (a different batch moves the gradient by tens of percent).
SUMMATION_ORDER_BOUND = 1e-4


def main(out: str, argv: list[str]) -> int:
    from safetensors.torch import save_file
    from spj_edge.cli import main as cli

    with first_step_gradients() as gradients:
        code = cli(argv)
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({f"{i}": g.contiguous() for i, g in enumerate(gradients)}, out)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
