"""Continuous batching: one Generator, many generations decoded together, one onnxruntime step for all of them.

A request is prefilled alone (the very step `Generator.generate` takes for it) and then joins the batch: its cache is
left-padded to the batch's length, or the batch's to its, and stacked on the batch axis. Between steps, the rows that
ended or whose client left are dropped, and the left padding that every remaining row has is cut off. Each row has its
own attention mask, positions and Sampler, so it draws what `Generator.generate` draws for its prompt alone: the
padding's attention weight is exactly 0, and a batch's kernels may only sum in another order (a logit moves by ulps,
see tests/conftest.py's logit_bound). That flips a choice only where it sits within that noise: a near tie, or a
top-p cut over a near-uniform distribution (random weights: 5 of 320 sampled requests of benchmarks/serve.py's
package differed; greedy ones and the test packages' never did).
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from typing import Iterator

import numpy as np

from ..errors import SPJError
from ..sampling import Sampler
from .generator import Generator
from .step import Step


class QueueFull(SPJError):
    """More requests wait than the server was told to hold."""


class Unavailable(SPJError):
    """The server is shutting down."""


class Generation:
    """One request's tokens, made by the batch's thread and read by the request's own.

    `tokens()` yields the new ids as they come (an EOS id ends them and is not yielded); then `finish_reason` is
    "stop" (EOS) or "length" (max_new_tokens, or the context is full)."""

    def __init__(self, prompt: list[int], steps: int, sampler: Sampler, eos: frozenset[int]):
        self.prompt, self.steps, self.sampler, self.eos = prompt, steps, sampler, eos
        self.history = list(prompt)  # what the sampler's repetition penalty reads; its last id is fed next
        self.made = 0
        self.ended = False  # the batch's own record: no more ids will come
        self.finish_reason: str | None = None  # the reader's: why they ended, once it has read them all
        self.cancelled = False  # set by the request's thread: the batch drops the row before its next step
        self._out: queue.SimpleQueue = queue.SimpleQueue()  # ids, then the finish reason or an exception

    def tokens(self) -> Iterator[int]:
        while isinstance(item := self._out.get(), int):
            yield item
        if isinstance(item, Exception):
            raise item
        self.finish_reason = item

    def cancel(self) -> None:
        """The reader is done (its client left, or a stop string came): stop making tokens for it."""
        self.cancelled = True

    # --- the batch's side ---------------------------------------------------------------------------------------------
    def take(self, token: int) -> None:
        """Record the id just sampled: the generation ends at an EOS id (not passed on) or at its last step."""
        self.history.append(token)
        if token not in self.eos:
            self._out.put(token)
            self.made += 1
        if token in self.eos or self.made == self.steps:
            self.ended = True
            self._out.put("stop" if token in self.eos else "length")

    def fail(self, error: Exception) -> None:
        self._out.put(error)

    @property
    def cached(self) -> int:
        """Positions the cache holds for this row: all but the id it is fed next."""
        return len(self.history) - 1


class Batcher:
    """Runs every generation on one thread: `submit` queues one, and between steps up to `max_batch` of them join
    the batch (prefilled one at a time) while the others wait; more than `max_queue` waiting beyond the batch's free
    rows are refused at once."""

    def __init__(self, generator: Generator, max_batch: int, max_queue: int):
        self.generator, self.max_batch, self.max_queue = generator, max_batch, max_queue
        self.rows: list[Generation] = []  # the batch, in the order of the cache's batch axis
        self.taken = 0  # rows in the batch or being prefilled to join it
        self.step: Step | None = None  # the batch's binding, its cache `length` positions long
        self.length = 0
        self.waiting: deque[Generation] = deque()
        self.closed = False
        self.changed = threading.Condition()  # guards taken, waiting and closed
        self.thread = threading.Thread(target=self._run, name="spj-edge batch", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], **options) -> Generation:
        """Queue a generation of `prompt` (ids) with Generator.tokens' options; refused with QueueFull (too many
        waiting), Unavailable (closed) or SPJError (a bad option), before any work."""
        (row,), steps, params, eos = self.generator._request([prompt], **options)
        generation = Generation(row, steps, Sampler(params, self.generator.vocab_limit), eos)
        with self.changed:
            if self.closed:
                raise Unavailable("the server is shutting down")
            if len(self.waiting) >= self.max_queue + self.max_batch - self.taken:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already, the most this server holds "
                                f"(--max-queue {self.max_queue}) beyond the {self.max_batch} it decodes together; "
                                "try again later")
            self.waiting.append(generation)
            self.changed.notify()
        return generation

    def close(self) -> None:
        """End every generation, running or waiting, with Unavailable, after the step under way."""
        with self.changed:
            self.closed = True
            self.changed.notify()
        self.thread.join()

    # --- the batch's thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while (joining := self._next()) is not None:
            try:
                self._advance(joining)
            except Exception as e:  # onnxruntime failed (or a bug): these requests fail, the server goes on serving
                error = e if isinstance(e, SPJError) else SPJError(f"internal error ({type(e).__name__}: {e})")
                for generation in [*self.rows, *joining]:
                    generation.fail(error)
                self._regroup([], [])
        for generation in [*self.rows, *self.waiting]:
            generation.fail(Unavailable("the server is shutting down"))

    def _next(self) -> list[Generation] | None:
        """The waiting generations that join before the next step (None once closed); waits while there is no work."""
        with self.changed:
            while not (self.closed or self.rows or self.waiting):
                self.changed.wait()
            if self.closed:
                return None
            joining = [self.waiting.popleft() for _ in range(min(self.max_batch - self.taken, len(self.waiting)))]
            self.taken += len(joining)
            return joining

    def _advance(self, joining: list[Generation]) -> None:
        """One step of the batch, then the joining generations' prompts, then the batch regrouped."""
        if self.rows:
            self._decode()
        prefilled = [(g, self._prefill(g)) for g in joining if not g.cancelled]
        self._regroup([g for g in self.rows if not (g.ended or g.cancelled)],
                      [(g, step) for g, step in prefilled if not g.ended])

    def _decode(self) -> None:
        rows, total = self.rows, self.length + 1
        ids = np.array([[g.history[-1]] for g in rows], np.int64)
        positions = np.array([[g.cached] for g in rows], np.int64)
        # a row's tokens are the last positions of the cache, which is left-padded where the row is shorter
        mask = (np.arange(total) >= total - 1 - positions).astype(np.int64)
        logits = self.step(ids, mask, positions)
        self.length = total
        for r, generation in enumerate(rows):
            if not generation.cancelled:
                generation.take(generation.sampler(logits[r, -1], generation.history))

    def _prefill(self, generation: Generation) -> Step:
        """The prompt's step, alone, as Generator.generate takes it, and its first id; the binding holding its cache."""
        step = self.generator.decoder.step(1, capacity=len(generation.prompt) + generation.steps)
        logits = step.extend(np.array([generation.prompt], np.int64))
        generation.take(generation.sampler(logits[0, -1], generation.history))
        return step

    def _regroup(self, staying: list[Generation], joining: list[tuple[Generation, Step]]) -> None:
        """The batch becomes the staying rows (in order) and then the joining ones."""
        if staying != self.rows or joining:
            self.rows, self.step, self.length = self._stacked(staying, joining)
        with self.changed:
            self.taken = len(self.rows)

    def _stacked(self, staying: list[Generation], joining: list[tuple[Generation, Step]]):
        """The rows, their binding and its cache's length, with the staying rows' cache and the joining ones' stacked
        into one."""
        if not staying and len(joining) == 1:  # one generation alone keeps its own binding: nothing is copied
            (generation, step), = joining
            return [generation], step, generation.cached
        rows = [*staying, *(g for g, _ in joining)]
        if not rows:
            return [], None, 0
        parts = [step.cache() for _, step in joining]  # each a list: one array per past input
        if staying:
            kept = [self.rows.index(g) for g in staying]
            parts.insert(0, [cache[kept] for cache in self.step.cache()])
        length = max(g.cached for g in rows)
        caches = [np.concatenate([_right_aligned(c, length) for c in same_input]) for same_input in zip(*parts)]
        # one position a step until the batch is regrouped, at the latest when its longest generation ends
        capacity = length + max(g.steps - g.made for g in rows)
        return rows, self.generator.decoder.step(len(rows), caches, capacity=capacity), length


def _right_aligned(cache: np.ndarray, length: int) -> np.ndarray:
    """`cache` [rows, kv_heads, positions, head_dim] in its last `length` positions: left-padded with zeros (the
    mask hides them), or without leading positions that are padding in every row."""
    have = cache.shape[2]
    if have >= length:
        return cache[:, :, have - length:]
    return np.pad(cache, ((0, 0), (0, 0), (length - have, 0), (0, 0)))
