"""Documents encoded by fastokens: the ids `tokenizers` gives, 15-40× as fast on one core (SmolLM2's tokenizer, ours).

fastokens (Crusoe's Rust re-implementation of `tokenizers`' encoding, Apache-2.0, which vLLM offers as a tokenizer
mode) reads tokenizer.json itself, splits text with PCRE2's JIT rather than Oniguruma, caches the ids of the words it
has merged, and hands a batch back as one buffer of uint32 ids and one of offsets: no Python object per token, which
is where a list-of-lists encoder spends much of its time. It refuses what it does not implement (some normalizers and
pre-tokenizers, WordPiece), and those tokenizers stay on `tokenizers`.

What its acceptance does not prove is that it reads every part alike: a Split regex PCRE2 and Oniguruma read
differently (Oniguruma's `$` matches before every newline, PCRE2's at the end only) converts and gives other ids. So
`checked_encoder` compares the two on a spread of the first documents, on texts that exercise the regexes' branches
and the bytes beyond ASCII, and on the special tokens' texts, before fastokens is used.

No wheel is published for Linux on ARM (it would build from source with a Rust toolchain), so the toolchain does not
install it there and documents are encoded by `tokenizers`.
"""
from __future__ import annotations

import itertools
import json
import sys
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

GUARD_SAMPLE_CHARS = 1 << 18  # of the documents checked_encoder compares: a fifth of a second of `tokenizers`' time
# And texts that exercise every branch of the usual regexes and the bytes beyond ASCII, compared besides.
PROBE_TEXTS = ("", " ", "\n\n \n", "  spaces before and after  ", "a" + " " * 40 + "b\t\t\r\n\r\n c \n", "x" * 300,
               "don't we'll I'M 'tis they've", "3.14159 1,000,000 x2 2x ١٢٣ ½ ² Ⅻ 〇", "naïve café Ünïcödé",
               "中文的文本，日本語のテキスト。한국어", "emoji 👍🏽 and 👨‍👩‍👧", "\u00a0nbsp\u2009thin\u3000wide",
               "\ttab\vvertical\fform\x85next\u2028line", "a\x00b\x04c\x7f", "#!@$%^&*()_+-=[]{};:'\",.<>/?\\|`~",
               "line one\nline two\n", "end of text", "x  1\n 22\t\t333 ,4 \n\n5")

# Digits(individual_digits) then ByteLevel's regex (GPT-2's) on the text between the digits, as one regex: each
# numeric character alone (Rust's char::is_numeric is \p{N}), and whitespace before one ends there as at the end of
# the text.
DIGITS_THEN_BYTE_LEVEL = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


class FastEncoder:
    """`encode(texts)` gives the ids `backend.encode_batch_fast(texts)` gives (the post-processor's frame, a special
    token's text as text, as specials_as_text makes `backend` encode it), end to end, with each text's offsets."""

    def __init__(self, backend: Tokenizer):
        if not backend.encode_special_tokens:
            raise ValueError("the backend turns special tokens' text into their ids (specials_as_text)")
        import fastokens  # as many threads as cores unless FASTOKENS_BPE_THREADS says (prepare's workers: one)

        spec = json.loads(backend.to_str())
        spec["pre_tokenizer"] = _one_regex(spec["pre_tokenizer"])
        self.backend = backend
        self.fast = fastokens.Tokenizer.from_json_str(json.dumps(spec))

    @classmethod
    def of(cls, backend: Tokenizer) -> FastEncoder | None:
        """None where fastokens is not installed or refuses the tokenizer."""
        try:
            return cls(backend)
        except (ImportError, ValueError):  # fastokens raises ValueError naming what it lacks
            return None

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids end to end (uint32), and the len(texts) + 1 offsets where each begins and the last ends."""
        try:
            ids, offsets = self.fast.encode_batch_flat(list(texts), add_special_tokens=True, split_special_tokens=True)
        except ValueError:  # a text with a byte the vocabulary lacks (SmolLM2's lacks 0x04): `tokenizers` drops it
            return end_to_end([self._encode_one(text) for text in texts])
        return np.frombuffer(ids, dtype="<u4"), np.frombuffer(offsets, dtype="<u8").astype(np.int64)

    def _encode_one(self, text: str) -> list[int]:
        try:
            return self.fast.encode(text, add_special_tokens=True, split_special_tokens=True).ids
        except ValueError:
            return self.backend.encode(text).ids


def _one_regex(pre_tokenizer: dict | None) -> dict | None:
    """Digits(individual_digits) then ByteLevel with its regex (SmolLM2's) as one Split regex then ByteLevel without
    it: the same pieces, and fastokens splits them 3.5× as fast (a Sequence with Digits is its slow path)."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or []
    if [step.get("type") for step in steps] != ["Digits", "ByteLevel"] or not steps[0].get("individual_digits") \
            or not steps[1].get("use_regex", True) or steps[1].get("add_prefix_space"):
        return pre_tokenizer
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": DIGITS_THEN_BYTE_LEVEL}, "behavior": "Isolated", "invert": False},
        {**steps[1], "use_regex": False}]}


def end_to_end(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids as FastEncoder.encode gives them: end to end (uint32), and the offsets of each."""
    offsets = np.cumsum([0, *map(len, encoded)])
    return np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.uint32, count=offsets[-1]), offsets


def checked_encoder(backend: Tokenizer, sample: Sequence[str], source: str) -> FastEncoder | None:
    """fastokens for `backend` if it takes it and gives `backend`'s ids for a part of `sample` (GUARD_SAMPLE_CHARS
    spread over it), for PROBE_TEXTS and for the special tokens' texts (in a document they are text); else None, said
    on stderr when it is for a difference."""
    fast = FastEncoder.of(backend)
    if fast is None:
        return None
    specials = [t.content for t in backend.get_added_tokens_decoder().values()]
    stride = max(1, sum(map(len, sample)) // GUARD_SAMPLE_CHARS)
    texts = [*sample[::stride], *PROBE_TEXTS, *specials, f"a{''.join(specials)} b"]
    ids, offsets = fast.encode(texts)
    if [piece.tolist() for piece in np.split(ids, offsets[1:-1])] != [e.ids for e in backend.encode_batch_fast(texts)]:
        print(f"{source}: fastokens' ids differ from tokenizers' for a sample text; documents are encoded with "
              "tokenizers (slower)", file=sys.stderr)
        return None
    return fast
