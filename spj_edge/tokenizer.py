"""A byte-level BPE tokenizer (Hugging Face `tokenizers`): any UTF-8 text, Chinese included, round-trips exactly.

No normalizer and no prefix space: the bytes of the text are the bytes of its tokens, so bits per byte can be
computed from per-token byte lengths and compared across tokenizers. The special tokens' text (`<|eos|>` typed in a
prompt or found in a corpus) is text too: only the code puts special ids in a sequence, never a user's text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import SPJError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2: SPJConfig's defaults


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise SPJError(f"--vocab-size must be at least {min_size} (256 bytes and {len(SPECIAL_TOKENS)} special "
                       f"tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return specials_as_text(tokenizer)


def specials_as_text(tokenizer: Tokenizer) -> Tokenizer:
    """Make `tokenizer` encode the text of its special tokens as ordinary bytes, and return it.

    By default `tokenizers` turns the text `<|eos|>` into the EOS id wherever it appears, so a prompt quoting it would
    stop generation, and decoding (which skips special ids) would drop it from the round trip. The setting is not
    saved in tokenizer.json, so every place that makes a Tokenizer applies it."""
    tokenizer.encode_special_tokens = True
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise SPJError(f"{path}: {'is a directory, expected tokenizer.json' if path.is_dir() else 'no such file'}")
    try:
        return specials_as_text(Tokenizer.from_file(str(path)))
    except Exception as e:  # the Rust side raises a bare Exception with a serde message
        raise SPJError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """tokenizer.json, byte for byte what `Tokenizer.save` writes; written from Python so that a failure (a full disk)
    is an OSError naming the file, not the bare Exception the Rust side raises."""
    Path(path).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {name: tokenizer.token_to_id(token) for name, token in
           (("pad_token_id", PAD), ("bos_token_id", BOS), ("eos_token_id", EOS))}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise SPJError(f"tokenizer lacks the special tokens {', '.join(SPECIAL_TOKENS)}")
    return ids


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each id stands for. Byte-level BPE maps every byte to one character of its alphabet, so a token's
    byte length is its string length; special tokens and ids past the tokenizer's vocabulary stand for no bytes."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = {tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    for token, i in tokenizer.get_vocab(with_added_tokens=False).items():
        if i < vocab_size and i not in special:
            lengths[i] = len(token)
    return lengths


def check_utf8(text: str, what: str) -> None:
    """A str can hold lone surrogates (from a filesystem name or stdin decoded with surrogateescape) that have no
    UTF-8 form; `tokenizers` refuses them with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SPJError(f"{what} is not valid Unicode text: {text[e.start:e.end]!a} at character {e.start} has no "
                       "UTF-8 form") from None


def check_prompt_fits(length: int, context: int) -> None:
    if length >= context:
        raise SPJError(f"prompt is {length} tokens with <bos>; the model's context is {context}, which leaves no "
                       "room to generate")


def encode_prompt(tokenizer: Tokenizer, prompt: str, context: int, bos_id: int) -> list[int]:
    """<bos> and the prompt's tokens, as in training; refused before any work if it fills the context."""
    check_utf8(prompt, "prompt")
    ids = [bos_id, *tokenizer.encode(prompt, add_special_tokens=False).ids]
    check_prompt_fits(len(ids), context)
    return ids


def check_matches_model(tokenizer: Tokenizer, vocab_size: int, source: str) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise SPJError(f"{source}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}: "
                       "they do not belong together")
