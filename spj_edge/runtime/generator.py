"""Generation with onnxruntime alone: the prompt in one step, then one token per step with the KV cache.

A prompt is framed as the package's tokenizer frames it (its post-processor's <bos>, or none), a conversation as its
chat template renders it (`chat`), and generation stops at any of the package's EOS ids. The steps themselves, with
the KV cache kept in onnxruntime, are step.py's.
"""
from __future__ import annotations

import codecs
import math
import os
import re
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer, decoders

from .. import contract
from ..errors import SPJError
from ..sampling import Sampler, SamplingParams
from ..tokenizer import SpecialIds, TextTokenizer, check_matches_model, check_prompt_fits
from .graph import check_graph
from .reader import MODEL, TOKENIZER, Package, read_package
from .step import Decoder, open_session

# A prompt's most bytes: far more than any context holds, few enough to tokenize in a moment.
PROMPT_MAX_BYTES = 1 << 20
THREADS_PER_CORE = 4  # onnxruntime crashes on absurd thread counts; more than this only makes threads wait


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_threads() -> int:
    """The cores other work leaves idle (the cores minus the load average): at least 1, at most 4.

    Measured with benchmarks/runtime_speed.py on a 2-core host busy with other jobs: one thread decoded 1.5 to 2 times
    faster than two, because onnxruntime's threads spin waiting for each other on cores that are not free, so its own
    default (every physical core) is the slow choice there. On an idle device every core helps, up to the 4 of a
    Raspberry Pi; a single-token step of a model this size has too little work per op to share among more."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this system
        busy = 0
    return max(1, min(cores() - busy, 4))


class Generator:
    """A loaded package. One Generator serves any number of threads at once: the onnxruntime session is shared and
    each generation has its own binding and cache."""

    def __init__(self, package: Package, threads: int | None = None):
        manifest, config = package.manifest, package.config
        self.package = package
        check_graph(package.files[MODEL], manifest, f"{package.source}: {MODEL}", package.weights_bytes)  # first
        self.context = config["max_position_embeddings"]
        self.vocab_size = config["vocab_size"]
        self.tokenizer = package_tokenizer(package)
        check_matches_model(self.tokenizer, self.vocab_size, f"{package.source}: {TOKENIZER}")
        self.threads = default_threads() if threads is None else threads
        shape = config["num_hidden_layers"], config["num_key_value_heads"], config["head_dim"]
        self.decoder = Decoder(_session(package, self.threads), contract.inputs(*shape),
                               contract.outputs(*shape, self.vocab_size), self.context, f"{package.source}: {MODEL}",
                               last_logits_only=manifest.get("logits") == "last")
        special = self.tokenizer.special
        self.bos_id, self.eos_ids, self.pad_id = special.bos, special.eos, special.pad
        # The model's vocabulary may be padded past the tokenizer's: those ids decode to nothing, never pick them.
        self.vocab_limit = min(self.tokenizer.get_vocab_size(), self.vocab_size)
        self.defaults = manifest["generation"]
        self.kv_bytes_per_token = sum(math.prod(d for d in s.dims if isinstance(d, int)) * np.dtype(s.dtype).itemsize
                                      for s in self.decoder.inputs[3:])  # the fixed axes: kv_heads × head_dim

    @classmethod
    def load(cls, path, threads: int | None = None) -> Generator:
        """A package directory or its .tar.gz; every file is verified against spj.json before anything is loaded."""
        return cls(read_package(path), threads)

    # --- the API ----------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """The ids the model is given for a prompt: the text's tokens as the tokenizer frames them (<bos> in front,
        for our presets), or the ids as they are."""
        if isinstance(prompt, str):
            size = len(prompt.encode("utf-8", "surrogatepass"))
            if size > PROMPT_MAX_BYTES:
                raise SPJError(f"prompt is {size} bytes, more than the {PROMPT_MAX_BYTES} this runtime accepts (the "
                               f"model's context is {self.context} tokens)")
            with _panics_as_errors(f"{self.package.source}: {TOKENIZER}"):
                return self.tokenizer.encode_prompt(prompt, self.context)
        ids = [int(i) for i in prompt]
        if not ids or not all(0 <= i < self.vocab_size for i in ids):
            raise SPJError(f"prompt ids must be a non-empty list of ids in [0, {self.vocab_size})")
        check_prompt_fits(len(ids), self.context)
        return ids

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """The ids of a conversation ([{"role": "user", "content": "..."}, ...]) as the package's chat template renders
        it, ready for the assistant's reply. A special token's text in a message stays text."""
        with _panics_as_errors(f"{self.package.source}: {TOKENIZER}"):
            return self.tokenizer.encode_chat(messages, self.context)

    def chat_stream(self, messages: Sequence[dict], **options) -> Iterator[str]:
        """The assistant's reply to a conversation, as text pieces (see `stream`); it ends at an EOS id (SmolLM2's
        <|im_end|>). Options as for `tokens`."""
        return self.stream(self.encode_chat(messages), **options)

    def chat(self, messages: Sequence[dict], **options) -> str:
        return "".join(self.chat_stream(messages, **options))

    def tokens(self, prompt: str | Sequence[int], **options) -> Iterator[int]:
        """The new token ids, as they are produced. `prompt` is text (framed as `encode` frames it) or ids.
        Options: max_new_tokens, temperature (0: greedy), top_k, top_p, repetition_penalty, seed, ignore_eos; the
        package's generation defaults fill in the rest. A bad request fails here, before any work."""
        (row,), steps, params, eos = self._request([prompt], **options)
        return self.decoder.continuation(row, steps, Sampler(params, self.vocab_limit), eos)

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
        for step in self.decoder.decode(rows, steps, [Sampler(params, self.vocab_limit) for _ in rows], self.pad_id):
            for r, token in enumerate(step):
                done[r] = done[r] or token in eos
                if not done[r]:
                    new_ids[r].append(token)
            if all(done):
                break
        with _panics_as_errors(TOKENIZER):
            return [decode_whole_characters(self.tokenizer, ids) for ids in new_ids]

    def next_token_logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits [batch, length, vocab] for the token after every prefix of each row of `windows` [batch, length],
        fed one token per step through the KV cache: what generation on the device computes, position by position
        (a package's graph may give the last position's logits only). For `spj-edge eval`."""
        return self.decoder.logits(windows, one_token_a_step=True)

    def describe(self) -> str:
        m = self.manifest
        full = self.kv_bytes_per_token * self.context
        return (f"{self.package.source}: {m['graph']} graph, opset {m['opset']}, quantization "
                f"{m['quantization']['mode']}, threads {self.threads}; KV cache {self.kv_bytes_per_token / 1024:.1f} "
                f"KiB per token, {full / 2**20:.1f} MiB at the full context of {self.context} tokens")

    @property
    def manifest(self) -> dict:
        return self.package.manifest

    # --- the request ------------------------------------------------------------------------------------------------
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
        return rows, steps, params, frozenset() if ignore_eos else frozenset(self.eos_ids)


def text_pieces(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """Decoded text as it becomes final. Decoding everything so far each time (as the PyTorch reference does) keeps
    the text right for any tokenizer's decoder; at a context of a thousand tokens it costs well under a token's time.

    A character split across tokens shows as U+FFFD until its last byte comes, so text ending in one waits; if the
    tokens end inside a character (max_new_tokens cut it), that broken tail is dropped rather than shown."""
    ids, shown = [], ""
    with _panics_as_errors(TOKENIZER):
        for token in tokens:
            ids.append(token)
            text = tokenizer.decode(ids)
            if len(text) > len(shown) and not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text
        text = decode_whole_characters(tokenizer, ids)
    if len(text) > len(shown):
        yield text[len(shown):]


def decode_whole_characters(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of `ids`, less a character they end inside of."""
    text = tokenizer.decode(ids)
    return text[:-1] if text.endswith("\ufffd") and _ends_inside_a_character(tokenizer, ids) else text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, which decoders.ByteLevel undoes: the printable bytes stand for themselves, the
    others for the characters from U+0100 on, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


_BYTE_OF_CHARACTER = _byte_level_alphabet()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte fallback


def _ends_inside_a_character(tokenizer: Tokenizer, ids: list[int]) -> bool:
    """Whether the bytes of `ids` end with an incomplete UTF-8 sequence, as opposed to a U+FFFD the model wrote (whole
    bytes EF BF BD) or bytes that are invalid anyway. A character has at most 4 bytes and a token at least 1, so the
    last 3 tokens that stand for bytes (special tokens decode to nothing) hold any incomplete tail."""
    tail = [i for i in ids[-8:] if tokenizer.decode([i])][-3:]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(b"".join(_token_bytes(tokenizer, i) for i in tail))
    return bool(decoder.getstate()[0])  # what the decoder holds back, waiting for the rest of a character


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    token = tokenizer.id_to_token(token_id) or ""
    if isinstance(tokenizer.decoder, decoders.ByteLevel) and all(c in _BYTE_OF_CHARACTER for c in token):
        return bytes(_BYTE_OF_CHARACTER[c] for c in token)
    byte = _BYTE_TOKEN.fullmatch(token)
    return bytes([int(byte[1], 16)]) if byte else token.encode("utf-8")


@contextmanager
def _panics_as_errors(where: str):
    """tokenizers panics in Rust on some inputs (a pattern that backtracks too long), which Python sees as pyo3's
    PanicException: a BaseException, so `except Exception` misses it."""
    try:
        yield
    except BaseException as e:
        if not _is_panic(e):
            raise
        raise SPJError(f"{where} failed on this text ({str(e).splitlines()[0][:200]})") from None


def _is_panic(e: BaseException) -> bool:
    return type(e).__name__ == "PanicException"


def package_tokenizer(package: Package) -> TextTokenizer:
    """tokenizer.json with the special ids, chat template and generation defaults of the manifest (reader.py checked
    them). A package made before the manifest had eos_token_ids holds one of our presets' tokenizers, whose
    tokenizer.json says the rest."""
    where = f"{package.source}: {TOKENIZER}"
    try:
        backend = Tokenizer.from_str(package.files[TOKENIZER].decode("utf-8"))
    except BaseException as e:  # the Rust side raises a bare Exception with a serde message, or panics
        if not (isinstance(e, Exception) or _is_panic(e)):
            raise
        reason = str(e).splitlines()[0][:120]
        raise SPJError(f"{where} is not a valid tokenizer ({reason})") from None
    manifest, special = package.manifest, package.manifest["special_tokens"]
    if "eos_token_ids" not in special:
        return TextTokenizer.of(backend, where)
    ids = SpecialIds(special["bos_token_id"], tuple(special["eos_token_ids"]), special["pad_token_id"],
                     special["add_bos_token"])
    return TextTokenizer(backend, ids, manifest.get("chat_template"), manifest["generation"], source=where)


def _session(package: Package, threads: int) -> ort.InferenceSession:
    if threads < 1:
        raise SPJError(f"threads must be ≥ 1, got {threads}")
    if threads > THREADS_PER_CORE * cores():
        raise SPJError(f"threads must be ≤ {THREADS_PER_CORE * cores()} ({THREADS_PER_CORE} per core of the "
                       f"{cores()} here), got {threads}")
    # From a path, onnxruntime maps the weights file and uses it in place: one copy of the model in memory.
    model = package.files[MODEL] if package.model_folder is None else str(package.model_folder / MODEL)
    try:
        return open_session(model, threads)
    except Exception as e:  # onnxruntime's own exception types, with multi-line messages
        raise SPJError(f"{package.source}: onnxruntime {ort.__version__} cannot load {MODEL} "
                       f"({str(e).splitlines()[0][:200]})") from None
