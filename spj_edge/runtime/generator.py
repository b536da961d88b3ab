"""Generation with onnxruntime alone: the prompt in one step, then one token per step with the KV cache.

The cache never leaves onnxruntime: each step's `present.*` outputs are OrtValues that the IOBinding binds as the next
step's `past_key_values.*` inputs, with no copy through numpy. The small inputs (ids, mask, positions) are numpy
buffers bound in place, and a package whose graph computes the last position's logits only (`"logits": "last"` in
spj.json) writes them into one buffer that lives for the whole generation.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from .. import contract
from ..errors import SPJError
from ..sampling import Sampler, SamplingParams
from ..tokenizer import check_matches_model, check_prompt_fits, encode_prompt, specials_as_text
from .reader import MODEL, TOKENIZER, Package, read_package


def default_threads() -> int:
    """The cores other work leaves idle (the cores minus the load average): at least 1, at most 4.

    Measured with benchmarks/runtime_speed.py on a 2-core host busy with other jobs: one thread decoded 1.5 to 2 times
    faster than two, because onnxruntime's threads spin waiting for each other on cores that are not free, so its own
    default (every physical core) is the slow choice there. On an idle device every core helps, up to the 4 of a
    Raspberry Pi; a single-token step of a model this size has too little work per op to share among more."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this system
        busy = 0
    return max(1, min(cores - busy, 4))


class Generator:
    """A loaded package. One Generator serves any number of threads at once: the onnxruntime session is shared and
    each generation has its own binding and cache."""

    def __init__(self, package: Package, threads: int | None = None):
        manifest, config = package.manifest, package.config
        self.package = package
        self.context = config["max_position_embeddings"]
        self.vocab_size = config["vocab_size"]
        shape = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
        self.inputs = contract.inputs(*shape)
        self.outputs = contract.outputs(*shape, self.vocab_size)
        self.tokenizer = _tokenizer(package)
        check_matches_model(self.tokenizer, self.vocab_size, f"{package.source}: {TOKENIZER}")
        self.threads = default_threads() if threads is None else threads
        self.session = _session(package, self.threads)
        self._check_contract()
        special = manifest["special_tokens"]
        self.bos_id, self.eos_id, self.pad_id = (special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))
        # The model's vocabulary may be padded past the tokenizer's: those ids decode to nothing, never pick them.
        self.vocab_limit = min(self.tokenizer.get_vocab_size(), self.vocab_size)
        self.defaults = manifest["generation"]
        self.last_logits_only = manifest.get("logits") == "last"
        self.kv_bytes_per_token = sum(math.prod(d for d in s.dims if isinstance(d, int)) * np.dtype(s.dtype).itemsize
                                      for s in self.inputs[3:])  # the fixed axes: kv_heads × head_dim

    @classmethod
    def load(cls, path, threads: int | None = None) -> Generator:
        """A package directory or its .tar.gz; every file is verified against spj.json before anything is loaded."""
        return cls(read_package(path), threads)

    # --- the API ----------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The ids the model is given for a prompt: <bos> and the text's tokens, or the ids as they are."""
        if isinstance(prompt, str):
            return encode_prompt(self.tokenizer, prompt, self.context, self.bos_id)
        ids = [int(i) for i in prompt]
        if not ids or not all(0 <= i < self.vocab_size for i in ids):
            raise SPJError(f"prompt ids must be a non-empty list of ids in [0, {self.vocab_size})")
        check_prompt_fits(len(ids), self.context)
        return ids

    def tokens(self, prompt: str | Sequence[int], **options) -> Iterator[int]:
        """The new token ids, as they are produced. `prompt` is text (<bos> is put in front, as in training) or ids.
        Options: max_new_tokens, temperature (0: greedy), top_k, top_p, repetition_penalty, seed, ignore_eos; the
        package's generation defaults fill in the rest. A bad request fails here, before any work."""
        (row,), steps, params, eos = self._request([prompt], **options)
        return self._tokens(row, steps, Sampler(params, self.vocab_limit), eos)

    def stream(self, prompt: str | Sequence[int], **options) -> Iterator[str]:
        """The continuation as text pieces, each one final (a character split across tokens waits for its rest)."""
        return text_pieces(self.tokenizer, self.tokens(prompt, **options))

    def generate(self, prompt: str | Sequence[int], **options) -> str:
        return "".join(self.stream(prompt, **options))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **options) -> list[str]:
        """Several prompts in one batch, left-padded to the longest; each row stops at its own EOS. With a seed, each
        row draws what `generate` draws for that prompt alone."""
        if not prompts:
            return []
        rows, steps, params, eos = self._request(prompts, **options)
        new_ids: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        for step in self._decode(rows, steps, [Sampler(params, self.vocab_limit) for _ in rows]):
            for r, token in enumerate(step):
                done[r] = done[r] or token == eos
                if not done[r]:
                    new_ids[r].append(token)
            if all(done):
                break
        return self.tokenizer.decode_batch(new_ids)

    def next_token_logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits [batch, length, vocab] for the token after every prefix of each row of `windows` [batch, length],
        fed one token per step through the KV cache: what generation on the device computes, position by position
        (a package's graph may give the last position's logits only). For `spj-edge eval`."""
        batch, length = windows.shape
        forward = _Step(self, batch)
        mask = np.ones((batch, length), np.int64)
        logits = np.empty((batch, length, self.vocab_size), np.float32)
        for t in range(length):
            logits[:, t] = forward(np.ascontiguousarray(windows[:, t:t + 1], np.int64), mask[:, :t + 1],
                                   np.full((batch, 1), t, np.int64))
        return logits

    def describe(self) -> str:
        m = self.manifest
        full = self.kv_bytes_per_token * self.context
        return (f"{self.package.source}: {m['graph']} graph, opset {m['opset']}, quantization "
                f"{m['quantization']['mode']}, threads {self.threads}; KV cache {self.kv_bytes_per_token / 1024:.1f} "
                f"KiB per token, {full / 2**20:.1f} MiB at the full context of {self.context} tokens")

    @property
    def manifest(self) -> dict:
        return self.package.manifest

    # --- the loop ---------------------------------------------------------------------------------------------------
    def _request(self, prompts, max_new_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, ignore_eos: bool = False):
        rows = [self.encode(p) for p in prompts]
        if max_new_tokens is None:
            max_new_tokens = self.defaults["max_new_tokens"]
        if max_new_tokens < 0:
            raise SPJError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
        given = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        params = SamplingParams(**{k: self.defaults[k] if v is None else v for k, v in given.items()}, seed=seed)
        steps = min(max_new_tokens, self.context - max(map(len, rows)))
        return rows, steps, params, None if ignore_eos else self.eos_id

    def _tokens(self, row: list[int], steps: int, sampler: Sampler, eos: int | None) -> Iterator[int]:
        for (token,) in self._decode([row], steps, [sampler]):
            if token == eos:
                return
            yield token

    def _decode(self, rows: list[list[int]], steps: int, samplers: list[Sampler]) -> Iterator[list[int]]:
        """Yield each step's next id per row, for `steps` steps or until the caller stops asking."""
        if not steps:
            return
        batch, width = len(rows), max(map(len, rows))
        ids = np.full((batch, width), self.pad_id, np.int64)
        mask = np.ones((batch, width + steps), np.int64)  # the generated tokens are all real; the padding is not
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = row
            mask[r, :width - len(row)] = 0
        positions = np.maximum(mask[:, :width].cumsum(axis=1) - 1, 0)
        histories = [list(row) for row in rows]
        forward = _Step(self, batch)
        logits = forward(ids, mask[:, :width], positions)
        token, position = np.empty((batch, 1), np.int64), positions[:, -1:] + 1
        for step in range(steps):
            if step:
                logits = forward(token, mask[:, :width + step], position)
                position += 1
            for r, (sample, history) in enumerate(zip(samplers, histories)):
                token[r, 0] = sample(logits[r], history)
                history.append(int(token[r, 0]))
            yield token[:, 0].tolist()

    def _check_contract(self):
        for kind, specs, found in (("inputs", self.inputs, self.session.get_inputs()),
                                   ("outputs", self.outputs, self.session.get_outputs())):
            wanted, have = {s.name for s in specs}, {v.name for v in found}
            if wanted != have:
                raise SPJError(f"{self.package.source}: {MODEL}'s {kind} do not follow the ONNX contract for its config"
                               f" (missing {sorted(wanted - have)}, unexpected {sorted(have - wanted)})")


class _Step:
    """One generation's IOBinding: a forward step, after which the outputs `present.*` are bound as the inputs
    `past_key_values.*` of the next step."""

    def __init__(self, generator: Generator, batch: int):
        self.session = generator.session
        self.binding = generator.session.io_binding()
        # contract.inputs lists input_ids, attention_mask, position_ids, then the cache in the order of outputs[1:].
        self.ids, self.mask, self.positions = (s.name for s in generator.inputs[:3])
        self.past = [s.name for s in generator.inputs[3:]]
        logits, *present = generator.outputs
        for spec in generator.inputs[3:]:
            self.binding.bind_cpu_input(spec.name, np.zeros(_shape(spec, batch, 0), spec.dtype))
        # The output bound first comes first in get_outputs(); rebinding a name keeps its place.
        if generator.last_logits_only:
            self.logits = np.empty(_shape(logits, batch, 1), logits.dtype)
            self.binding.bind_ortvalue_output(logits.name, ort.OrtValue.ortvalue_from_numpy(self.logits))
            self.dynamic = [s.name for s in present]
        else:
            self.logits = None
            self.dynamic = [logits.name, *(s.name for s in present)]

    def __call__(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The last position's logits, [batch, vocab]."""
        binding = self.binding
        binding.bind_cpu_input(self.ids, ids)
        binding.bind_cpu_input(self.mask, np.ascontiguousarray(mask))  # a view, no copy, at batch 1
        binding.bind_cpu_input(self.positions, positions)
        for name in self.dynamic:  # their shapes change every step: onnxruntime allocates them anew
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        for name, value in zip(self.past, present):
            binding.bind_ortvalue_input(name, value)
        return (logits.numpy() if self.logits is None else self.logits)[:, -1]


def _shape(spec: contract.TensorSpec, batch: int, length: int) -> tuple[int, ...]:
    """The spec's shape with its batch axis `batch` and its other dynamic axis `length`."""
    return tuple(batch if d == contract.BATCH else length if isinstance(d, str) else d for d in spec.dims)


def text_pieces(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Decoded text as it becomes final. Decoding everything so far each time (as the PyTorch reference does) keeps
    the text right for any tokenizer's decoder; at a context of a thousand tokens it costs well under a token's time."""
    ids, shown = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if len(text) > len(shown) and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            yield text[len(shown):]
            shown = text
    rest = tokenizer.decode(ids)[len(shown):]
    if rest:
        yield rest


def _tokenizer(package: Package) -> Tokenizer:
    try:
        return specials_as_text(Tokenizer.from_str(package.files[TOKENIZER].decode("utf-8")))
    except Exception as e:  # the Rust side raises a bare Exception with a serde message
        reason = str(e).splitlines()[0][:120]
        raise SPJError(f"{package.source}: {TOKENIZER} is not a valid tokenizer ({reason})") from None


def _session(package: Package, threads: int) -> ort.InferenceSession:
    if threads < 1:
        raise SPJError(f"threads must be ≥ 1, got {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: warnings would break the one-line output of the CLI
    try:
        return ort.InferenceSession(package.files[MODEL], options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types, with multi-line messages
        raise SPJError(f"{package.source}: onnxruntime {ort.__version__} cannot load {MODEL} "
                       f"({str(e).splitlines()[0][:200]})") from None
