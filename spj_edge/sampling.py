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
    every id is -inf none is preferred.

    One Sampler draws a generation's every token, so it works in two arrays of the vocabulary's size that it keeps:
    a new array of 32-49K doubles each time costs more in page faults (the allocator maps and unmaps arrays that big)
    than the arithmetic on it, and a sort of the whole vocabulary for top_p costs more than a small model's step."""

    def __init__(self, params: SamplingParams, vocab_limit: int):
        if vocab_limit < 1:
            raise SPJError(f"vocab_limit must be ≥ 1, got {vocab_limit}")
        self.params = params
        self.vocab_limit = vocab_limit
        self.rng = np.random.default_rng(params.seed)
        self.scores = np.empty(vocab_limit, np.float64)
        self.scratch = np.empty(vocab_limit, np.float64)

    @np.errstate(over="ignore")  # scores that overflow to ±inf are handled as such
    def __call__(self, logits: np.ndarray, history: list[int] | np.ndarray = ()) -> int:
        p = self.params
        values = np.asarray(logits)[: self.vocab_limit]
        scores, scratch = self.scores[: len(values)], self.scratch[: len(values)]
        np.copyto(scores, values)
        scores[np.isnan(scores)] = -np.inf
        if p.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            seen = seen[(seen >= 0) & (seen < len(scores))]  # a negative id would index from the end
            # CTRL's penalty, as transformers applies it: shrink positive logits, push negative ones further down.
            scores[seen] = np.where(scores[seen] > 0, scores[seen] / p.repetition_penalty,
                                    scores[seen] * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(scores))
        top = scores.max()
        if np.isinf(top):  # +inf: those ids share the mass; -inf everywhere: no preference (inf - inf is NaN)
            np.copyto(scores, np.where(scores == top, 0.0, -np.inf))
        else:  # shifted before scaling, so a tiny temperature cannot overflow the best score: it stays 0
            scores -= top
            scores /= p.temperature
        if 0 < p.top_k < len(scores):
            kth = _kth_largest(scores, p.top_k, scratch)
            scores[scores < kth] = -np.inf
        probs = np.exp(scores, out=scores)  # the best id gets 1: the sum is ≥ 1, never 0
        probs /= probs.sum()
        # numpy's choice(p=...) over the whole vocabulary, on the ids that can be drawn alone where top_p leaves few:
        # the cumulative sum skips only zeros, so it is the same, as is the draw (one uniform double, the first
        # cumulative value above it)
        ids = _nucleus(probs, p.top_p, scratch) if p.top_p < 1.0 else None
        cumulative = np.cumsum(probs, out=scratch) if ids is None else np.cumsum(probs[ids])
        cumulative /= cumulative[-1]
        drawn = int(np.searchsorted(cumulative, self.rng.random(), side="right"))
        return drawn if ids is None else int(ids[drawn])


def _kth_largest(values: np.ndarray, k: int, scratch: np.ndarray) -> float:
    np.copyto(scratch, values)
    scratch.partition(len(values) - k)
    return scratch[len(values) - k]


def _nucleus(probs: np.ndarray, top_p: float, scratch: np.ndarray) -> np.ndarray:
    """The ids, ascending, of the smallest set of most likely ids whose probabilities reach `top_p` (always at least
    the most likely one), equal probabilities taken lower id first, as a stable sort of the whole vocabulary orders
    them. Only that order's first ids matter: the k most likely ids, with every id tied with the k-th, are its
    prefix, so they alone are sorted, k growing until the prefix holds top_p."""
    k = 64
    while k < len(probs):
        kth = _kth_largest(probs, k, scratch)
        # ids without probability are never drawn: where fewer than k have any (after top_k), sort just those
        nucleus = _top_p_prefix(probs, np.flatnonzero(probs >= kth) if kth > 0 else np.flatnonzero(probs), top_p)
        if nucleus is not None:
            return nucleus
        if kth == 0:
            break
        k *= 4
    return _top_p_prefix(probs, np.arange(len(probs)), top_p)


def _top_p_prefix(probs: np.ndarray, candidates: np.ndarray, top_p: float) -> np.ndarray | None:
    """The nucleus, if the most likely `candidates` (the first ids of the whole order, or all ids) hold top_p."""
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    return np.sort(order[:cut]) if cut <= len(order) or len(order) == len(probs) else None
