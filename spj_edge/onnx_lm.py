"""A plain numpy driver for any graph of the ONNX contract: what the export checks, the quantizer's calibration and
accuracy gate, eval of an export and the speed figures run on. Torch-free. (The device runtime has its own loop, with
IOBinding.)"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract


class OnnxLM:
    def __init__(self, model: bytes | str | Path, config, threads: int = 0):
        """`config` is an SPJConfig (or anything with its shape fields); threads 0 is onnxruntime's default. A graph
        may have more outputs than the contract's (the quantizer's statistics read intermediate tensors): steps
        return the contract's."""
        self.config = config
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the quantized graphs' "hardware specific optimization" notices
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        layers = range(config.num_hidden_layers)
        self.output_names = ["logits", *(contract.present_name(i, kind) for i in layers for kind in ("key", "value"))]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        c = self.config
        return [np.zeros((batch, c.num_key_value_heads, 0, c.head_dim), np.float32)
                for _ in range(2 * c.num_hidden_layers)]

    def feed(self, input_ids, attention_mask, position_ids, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for i in range(self.config.num_hidden_layers):
            feed[contract.past_name(i, "key")], feed[contract.past_name(i, "value")] = past[2 * i], past[2 * i + 1]
        return feed

    def __call__(self, input_ids, attention_mask, position_ids, past: list[np.ndarray]):
        """logits and the present cache (as the next step's past)."""
        logits, *present = self.session.run(self.output_names,
                                            self.feed(input_ids, attention_mask, position_ids, past))
        return logits, present

    @staticmethod
    def step_inputs(ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """input_ids, attention_mask and position_ids for batch-1 `ids` that follow the tokens in `past`."""
        start = past[0].shape[2]
        length = start + ids.shape[1]
        return ids, np.ones((1, length), np.int64), np.arange(start, length)[None]

    def step(self, ids: np.ndarray, past: list[np.ndarray]):
        """Batch 1, no padding: logits and presents for `ids` after the tokens in `past`."""
        return self(*self.step_inputs(ids, past), past)

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        """Logits [len, vocab] for every position of a token window, from an empty past."""
        logits, _ = self.step(window[None].astype(np.int64), self.empty_past(1))
        return logits[0]

    def greedy(self, prompt_ids: list[int], new_tokens: int, sampler, eos: int | None) -> list[int]:
        """The new ids after `prompt_ids` (batch 1): the prompt in one step, then one token a step through the cache,
        for `new_tokens` steps or to the end of the context, stopping before `eos`. `sampler`: a sampling.Sampler."""
        history, past = list(prompt_ids), self.empty_past(1)
        ids = np.array([prompt_ids], np.int64)
        for _ in range(min(new_tokens, self.config.max_position_embeddings - len(prompt_ids))):
            logits, past = self.step(ids, past)
            token = sampler(logits[0, -1], history)
            if token == eos:
                break
            history.append(token)
            ids = np.array([[token]], np.int64)
        return history[len(prompt_ids):]

    def decode_rate(self, prompt_len: int, new_tokens: int, rng: np.random.Generator) -> tuple[float, float]:
        """(prompt ms, decode tokens/s) of one greedy generation from a random prompt, batch 1."""
        ids = rng.integers(3, self.config.vocab_size, (1, prompt_len))
        past, timings = self.empty_past(1), []
        for _ in range(new_tokens + 1):
            start = time.perf_counter()
            logits, past = self.step(ids, past)
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
