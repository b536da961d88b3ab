"""The toolchain's way into a graph of the ONNX contract (an export, or a quantizer's candidate): opened by path or as
bytes with the model's config, and stepped by the device runtime's own loop (spj_edge.runtime.step). What the export
check, the quantizer's calibration and accuracy gate, eval of an export and the speed figures run on. Torch-free."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from . import contract
from .runtime.step import Decoder, open_session


class OnnxLM(Decoder):
    def __init__(self, model: bytes | str | Path, config, threads: int = 0):
        """`config` is an SPJConfig (or anything with its shape fields); threads 0 is onnxruntime's default. A graph
        may have more outputs than the contract's (the quantizer's statistics read intermediate tensors): a step
        fetches those it is given as `extra_outputs`."""
        self.config = config
        shape = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        in_memory = isinstance(model, bytes)
        super().__init__(open_session(model if in_memory else str(model), threads), contract.inputs(*shape),
                         contract.outputs(*shape, config.vocab_size), config.max_position_embeddings,
                         "a graph in memory" if in_memory else str(model))

    def decode_rate(self, prompt_len: int, new_tokens: int, rng: np.random.Generator) -> tuple[float, float]:
        """(prompt ms, decode tokens/s) of one greedy generation from a random prompt, batch 1: the forward steps
        alone are timed."""
        ids = rng.integers(3, self.config.vocab_size, (1, prompt_len))
        step, timings = self.step(1, capacity=prompt_len + new_tokens), []
        for _ in range(new_tokens + 1):
            start = time.perf_counter()
            logits = step.extend(ids)
            timings.append(time.perf_counter() - start)
            ids = logits[:, -1:].argmax(-1)
        return timings[0] * 1000, new_tokens / sum(timings[1:])


def measure_speed(models: dict[str, bytes | str | Path], config, prompt_len: int = 32, new_tokens: int = 64,
                  repetitions: int = 3, threads: int = 0) -> dict[str, dict]:
    """Median decode tokens/s and prompt ms per model, repetitions interleaved across models so that a slow moment
    of the machine hits them all."""
    drivers = {name: OnnxLM(m, config, threads) for name, m in models.items()}
    rng = np.random.default_rng(0)
    for driver in drivers.values():  # warm-up: allocations, kernel selection
        driver.decode_rate(prompt_len, 4, rng)
    samples = {name: [] for name in drivers}
    for _ in range(repetitions):
        for name, driver in drivers.items():
            samples[name].append(driver.decode_rate(prompt_len, new_tokens, rng))
    return {name: {"decode_tokens_per_s": statistics.median(r for _, r in runs),
                   "decode_min_max": [min(r for _, r in runs), max(r for _, r in runs)],
                   "prompt_ms": statistics.median(p for p, _ in runs), "threads": threads or "default"}
            for name, runs in samples.items()}
