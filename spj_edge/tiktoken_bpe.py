"""A byte-level BPE tokenizer.json run by tiktoken: the ids `tokenizers` gives, 4-6× faster on one core.

tiktoken's BPE merges, in each piece its regex splits the text into, the adjacent parts whose concatenation has the
lowest rank; `tokenizers`' merges the adjacent pair listed first in tokenizer.json's merges. With each token's id as its
rank the two agree when ids grow with the merges that make them (so a lower rank is an earlier merge), and tiktoken's
one shortcut, a piece that is a token whole is that token, is what `tokenizers`' own merges make of it (checked for
every token). `TiktokenBPE.of` takes only tokenizer.json files where that holds and every other step is one tiktoken
reproduces or that changes no id, and raises NotConvertible for any other:
- model: BPE without dropout, unknown token, byte fallback, subword prefix or suffix, or ignore_merges;
- no normalizer; no truncation or padding;
- pre-tokenizer: ByteLevel with GPT-2's regex and no prefix space, that after Digits(individual_digits) (SmolLM2's:
  one regex does both), or a Split(regex, isolated) then ByteLevel without its regex (Llama 3's);
- post-processor: none, ByteLevel (offsets only), TemplateProcessing (ids before and after the text), or a Sequence
  of ByteLevel and at most one TemplateProcessing;
- added tokens: special ones only, which TextTokenizer has `tokenizers` encode as text as tiktoken does
  (specials_as_text); a non-special one is split out of the text by `tokenizers`.

Two things the checks do not prove: both regex engines (`tokenizers`' Oniguruma, tiktoken's fancy-regex) splitting
alike (they do not always: Oniguruma's `$` matches before every newline), and the two merge rules agreeing on
adjacent tokens whose concatenation is a token but not a listed merge of them. So checked_encoder compares the two on
sample documents before tiktoken is used.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Sequence

import tiktoken
from tokenizers import Tokenizer

GUARD_SAMPLE_CHARS = 1 << 18  # of the documents checked_encoder compares: a fifth of a second of `tokenizers`' time
# And texts that exercise every branch of the regexes and the bytes beyond ASCII, compared besides.
PROBE_TEXTS = ("", " ", "\n\n \n", "  spaces before and after  ", "a" + " " * 40 + "b\t\t\r\n\r\n c \n", "x" * 300,
               "don't we'll I'M 'tis they've", "3.14159 1,000,000 x2 2x ١٢٣ ½ ² Ⅻ 〇", "naïve café Ünïcödé",
               "中文的文本，日本語のテキスト。한국어", "emoji 👍🏽 and 👨‍👩‍👧", "\u00a0nbsp\u2009thin\u3000wide",
               "\ttab\vvertical\fform\x85next\u2028line", "a\x00b\x04c\x7f", "#!@$%^&*()_+-=[]{};:'\",.<>/?\\|`~")

# ByteLevel's own regex, GPT-2's
GPT2_SPLIT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then ByteLevel's regex on the text between the digits: each numeric character alone (Rust's
# char::is_numeric is \p{N}), and whitespace before one ends there as at the end of the text.
GPT2_SPLIT_DIGITS = r"""\p{N}|'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

# The byte each character of ByteLevel's alphabet stands for (GPT-2's bytes_to_unicode, inverted): printable Latin-1
# characters stand for themselves, the other bytes for U+0100 on, in order.
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_UNPRINTABLE = [b for b in range(256) if b not in _PRINTABLE]
BYTE_OF_CHAR = {**{chr(b): b for b in _PRINTABLE}, **{chr(256 + n): b for n, b in enumerate(_UNPRINTABLE)}}
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in BYTE_OF_CHAR.items()})
# Bytes no UTF-8 text holds: a vocabulary may lack them (SmolLM2's does).
NEVER_IN_UTF8 = {0xC0, 0xC1, *range(0xF5, 0x100)}


class NotConvertible(Exception):
    """tokenizer.json has something tiktoken does not reproduce; the message says what."""


def token_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for."""
    return token.translate(_TO_LATIN1).encode("latin-1")


class TiktokenBPE:
    """`encode_batch(documents)` gives the ids `backend.encode_batch_fast(documents)` gives."""

    def __init__(self, backend: Tokenizer, encoding: tiktoken.Encoding, before: list[int], after: list[int],
                 needs_backend: re.Pattern | None):
        self.backend, self.encoding = backend, encoding
        self.before, self.after = before, after  # what the post-processor puts around a text's ids
        self.needs_backend = needs_backend  # characters with bytes the vocabulary lacks (see _lacking_characters)

    @classmethod
    def of(cls, backend: Tokenizer) -> TiktokenBPE:
        spec = json.loads(backend.to_str())
        model = spec["model"]
        if model.get("type") != "BPE":
            raise NotConvertible(f"a {model.get('type')} model, not BPE")
        for key, off in (("dropout", None), ("unk_token", None), ("byte_fallback", False),
                         ("continuing_subword_prefix", ""), ("end_of_word_suffix", ""), ("ignore_merges", False)):
            if (model.get(key) or off) != off:
                raise NotConvertible(f"BPE with {key} {model[key]!r}")
        for key in ("normalizer", "truncation", "padding"):
            if spec.get(key) is not None:
                raise NotConvertible(f"a {key}")
        if not backend.encode_special_tokens and spec["added_tokens"]:
            raise NotConvertible("special tokens matched in the text")
        if split_out := [t["content"] for t in spec["added_tokens"] if not t["special"]]:
            raise NotConvertible(f"added tokens that are not special, split out of the text ({split_out[0]!r}, …)")
        split = _split_regex(spec["pre_tokenizer"])
        before, after = _frame(spec["post_processor"])
        vocab = model["vocab"]
        needs_backend = _lacking_characters({b for c, b in BYTE_OF_CHAR.items() if c not in vocab})
        merged = _merged_tokens(vocab, model["merges"])
        ranks = {bytes([b]): vocab[c] for c, b in BYTE_OF_CHAR.items() if c in vocab}
        ranks.update((token_bytes(token), i) for token, i in merged.items())
        try:
            encoding = tiktoken.Encoding(f"spj-edge-{len(ranks)}", pat_str=split, mergeable_ranks=ranks,
                                         special_tokens={})
        except ValueError as e:  # fancy-regex refuses the pattern
            raise NotConvertible(f"tiktoken refuses it ({e})") from None
        _check_tokens_whole(backend.model, merged)
        return cls(backend, encoding, before, after, needs_backend)

    def encode_batch(self, documents: list[str]) -> list[list[int]]:
        return [self.backend.encode(d).ids if self.needs_backend and self.needs_backend.search(d)
                else [*self.before, *self.encoding.encode_ordinary(d), *self.after] for d in documents]


def checked_encoder(backend: Tokenizer, sample: Sequence[str], source: str) -> TiktokenBPE | None:
    """tiktoken for `backend` if it converts and gives `backend`'s ids for a part of `sample` (GUARD_SAMPLE_CHARS
    spread over it), for PROBE_TEXTS and for the special tokens' texts (in a document they are text); else None,
    said on stderr when it is for a difference."""
    try:
        fast = TiktokenBPE.of(backend)
    except NotConvertible:
        return None
    specials = [t.content for t in backend.get_added_tokens_decoder().values()]
    stride = max(1, sum(map(len, sample)) // GUARD_SAMPLE_CHARS)
    texts = [*sample[::stride], *PROBE_TEXTS, *specials, f"a{''.join(specials)} b"]
    if fast.encode_batch(texts) != [e.ids for e in backend.encode_batch_fast(texts)]:
        print(f"{source}: tiktoken's ids differ from tokenizers' for a sample text; documents are encoded with "
              "tokenizers (slower)", file=sys.stderr)
        return None
    return fast


def _merged_tokens(vocab: dict[str, int], merges: list) -> dict[str, int]:
    """The token each merge makes, with its id, checked to grow with the merges."""
    merged, last = {}, -1
    for n, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge  # older files write "a b"
        token = left + right
        if vocab.get(token, -1) <= last:
            raise NotConvertible(f"merge {n} ({left!r}, {right!r}) makes "
                                 + (f"id {vocab[token]}, not above the previous merge's {last}" if token in vocab
                                    else "a token the vocabulary lacks"))
        if not set(token) <= BYTE_OF_CHAR.keys():
            raise NotConvertible(f"token {token!r} is not of ByteLevel's alphabet")
        merged[token] = last = vocab[token]
    return merged


def _check_tokens_whole(model, merged: dict[str, int]) -> None:
    """tiktoken makes a piece that is a token that token without merging; `tokenizers`' merges must make it too."""
    for token, i in merged.items():
        if [t.id for t in model.tokenize(token)] != [i]:
            raise NotConvertible(f"the merges make {token!r} of other tokens than itself")


def _split_regex(pre_tokenizer: dict | None) -> str:
    """The one regex that splits text as the pre-tokenizer does."""
    def byte_level(step: dict, use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space")
                and step.get("use_regex", True) == use_regex)

    steps = (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer])
    if len(steps) == 1 and byte_level(steps[0], use_regex=True):
        return GPT2_SPLIT
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and byte_level(steps[1], use_regex=True):
        return GPT2_SPLIT_DIGITS
    if len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in steps[0].get("pattern", {}) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert") \
            and byte_level(steps[1], use_regex=False):
        return steps[0]["pattern"]["Regex"]
    raise NotConvertible(f"pre-tokenizer {json.dumps(pre_tokenizer)[:200]}")


def _frame(post_processor: dict | None) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text's."""
    steps = (post_processor or {}).get("processors", [post_processor] if post_processor else [])
    steps = [step for step in steps if step["type"] != "ByteLevel"]  # it moves offsets only
    if not steps:
        return [], []
    if len(steps) > 1 or steps[0]["type"] != "TemplateProcessing":
        raise NotConvertible(f"post-processor {' then '.join(step['type'] for step in steps)}")
    template = steps[0]
    pieces = template["single"]
    sequences = [n for n, piece in enumerate(pieces) if "Sequence" in piece]
    if [pieces[n]["Sequence"]["id"] for n in sequences] != ["A"]:
        raise NotConvertible("a template that is not one text between special tokens")

    def ids(part: list[dict]) -> list[int]:
        return [i for piece in part for i in template["special_tokens"][piece["SpecialToken"]["id"]]["ids"]]

    return ids(pieces[:sequences[0]]), ids(pieces[sequences[0] + 1:])


def _lacking_characters(lacking: set[int]) -> re.Pattern | None:
    """The characters whose UTF-8 holds a byte the vocabulary lacks. `tokenizers` drops such a byte (and merges what
    was on either side of it), which tiktoken cannot do: documents with one go to `tokenizers`."""
    ranges = []
    for b in sorted(lacking - NEVER_IN_UTF8):
        if b < 0x80:
            first, count = b, 1
        elif 0xC2 <= b <= 0xDF:  # the lead byte of 2-byte characters
            first, count = (b & 0x1F) << 6, 1 << 6
        elif 0xE0 <= b <= 0xEF:
            first, count = (b & 0x0F) << 12, 1 << 12
        elif 0xF0 <= b <= 0xF4:
            first, count = (b & 0x07) << 18, 1 << 18
        else:  # a continuation byte is in characters everywhere
            raise NotConvertible(f"the vocabulary lacks byte {b:#04x}")
        ranges.append(f"{re.escape(chr(first))}-{re.escape(chr(first + count - 1))}")
    return re.compile(f"[{''.join(ranges)}]") if ranges else None
