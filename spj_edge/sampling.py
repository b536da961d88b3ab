"""Next-token choice from logits, in numpy: the PyTorch reference and the ONNX runtime share it, so a seed gives the
same text on both."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import SPJError


# `spj-edge generate`'s defaults, and those a package's manifest gives the device where the model's
# generation_config.json gives none: it samples as the reference does unless told otherwise. (SamplingParams' own
# defaults are greedy: what eval and the checks use.)
GENERATION_DEFAULTS = {"max_new_tokens": 128, "temperature": 0.8, "top_k": 0, "top_p": 0.95, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise SPJError(f"{name} must be a finite number, got {getattr(self, name)}")
        checks = (
            (self.temperature >= 0, f"temperature must be ≥ 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be ≥ 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        )
        for ok, message in checks:
            if not ok:
                raise SPJError(message)
        # numpy's generator takes any non-negative integer and raises a bare ValueError for a negative one
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise SPJError(f"seed must be an integer ≥ 0, got {self.seed}")


class Sampler:
    """Picks ids below `vocab_limit` (the tokenizer's size: the model's vocabulary may be padded past it).

    Any logits give an id: NaN counts as -inf, and infinite scores (an overflowing model, or a huge logit divided by a
    tiny temperature or penalty) are handled as the limit they stand for: the +inf ids share all the mass, and where
    every id is -inf none is preferred."""

    def __init__(self, params: SamplingParams, vocab_limit: int):
        if vocab_limit < 1:
            raise SPJError(f"vocab_limit must be ≥ 1, got {vocab_limit}")
        self.params = params
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(params.seed)

    @np.errstate(over="ignore")  # scores that overflow to ±inf are handled as such
    def __call__(self, logits: np.ndarray, history: list[int] | np.ndarray = ()) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float64)[: self.vocab_limit].copy()
        logits[np.isnan(logits)] = -np.inf
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < len(logits))]  # a negative id would index from the end
            # CTRL's penalty, as transformers applies it: shrink positive logits, push negative ones further down.
            logits[seen] = np.where(logits[seen] > 0, logits[seen] / p.repetition_penalty,
                                    logits[seen] * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        top = logits.max()
        if np.isinf(top):  # +inf: those ids share the mass; -inf everywhere: no preference (inf - inf is NaN)
            logits = np.where(logits == top, 0.0, -np.inf)
        else:  # shifted before scaling, so a tiny temperature cannot overflow the best score: it stays 0
            logits = (logits - top) / p.temperature
        if 0 < p.top_k < len(logits):
            kth = np.partition(logits, -p.top_k)[-p.top_k]
            logits[logits < kth] = -np.inf
        probs = np.exp(logits)  # the best id gets 1: the sum is ≥ 1, never 0
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
            cut = int(np.searchsorted(cumulative, p.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self.rng.choice(len(probs), p=probs))
