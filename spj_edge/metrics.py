"""The figures every stage reports on text, each written once: bits per byte, perplexity and top-1 agreement. numpy
only: training and pruning give them sums from torch, eval and the quantizer's gate logits from any runtime."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np

# Tokens per scored window (or the model's context, if shorter), in eval and in the quantizer's accuracy gate.
SCORED_WINDOW = 128


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """The summed negative log-likelihood (nats) of the scored tokens, in bits, over the UTF-8 bytes they stand for.
    Unlike perplexity, it does not depend on the tokenizer, as long as the scored tokens are those that stand for text:
    a special token (<bos>, <eos>, <|im_end|>) stands for no bytes, so the cost of predicting it is not scored."""
    return nll / math.log(2) / n_bytes


def perplexity(nll: float, tokens: int) -> float:
    """Per token; capped at e^50, which an untrained model's loss would overflow."""
    return math.exp(min(nll / tokens, 50.0))


def top1_agreement(top1: np.ndarray, baseline_top1: np.ndarray) -> float:
    """The share of positions where both models rank the same next token first."""
    return float((np.asarray(top1) == np.asarray(baseline_top1)).mean())


@dataclass
class Figures:
    """What one model gives on a set of scored windows."""
    nll: float  # nats, summed over the scored tokens: those that stand for text
    tokens: int
    bytes: int
    top1: np.ndarray  # the argmax id at every position, special tokens' too: where generation stops counts

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(self.nll, self.bytes)

    @property
    def perplexity(self) -> float:
        return perplexity(self.nll, self.tokens)

    @classmethod
    def pooled(cls, parts: list[Figures]) -> Figures:
        """Several sets as one: the sums add up, and the positions follow one another."""
        return cls(sum(p.nll for p in parts), sum(p.tokens for p in parts), sum(p.bytes for p in parts),
                   np.concatenate([p.top1 for p in parts]) if parts else np.zeros(0, np.int64))


def figures(scored: Iterable[tuple[np.ndarray, np.ndarray]], byte_lengths: np.ndarray) -> Figures:
    """From (window [length], logits [length, vocab]) pairs, where the logits at t predict window[t + 1];
    `byte_lengths[id]`: the UTF-8 bytes a token stands for (TextTokenizer.byte_lengths). Only targets that stand for
    bytes are scored."""
    nll, tokens, n_bytes, top1 = 0.0, 0, 0, []
    for window, logits in scored:
        logits, targets = logits[:-1].astype(np.float64), window[1:]
        text = byte_lengths[targets] > 0
        shifted = logits[text] - logits[text].max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll -= log_probs[np.arange(len(log_probs)), targets[text]].sum()
        tokens += int(text.sum())
        n_bytes += int(byte_lengths[targets].sum())
        top1.append(logits.argmax(-1))
    return Figures(nll, tokens, n_bytes, np.concatenate(top1) if top1 else np.zeros(0, np.int64))
