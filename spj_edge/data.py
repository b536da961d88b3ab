"""Text files → token stream → fixed-length training windows, with a held-out split that depends only on the seed."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import SPJError
from .options import CALIB_HELD_OUT
from .tokenizer import TextTokenizer


def find_text_files(paths: list[str | Path]) -> list[Path]:
    """The files named, and every non-hidden file below the directories named, in a stable order."""
    if not paths:
        raise SPJError("no data given (pass --data PATH: text files or directories of them)")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise SPJError(f"{p}: directory has no files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise SPJError(f"{p}: no such file or directory")
    return files


# Text is read whole and tokenized in memory: a bigger file (or a sparse one that claims to be) is refused unread.
TEXT_MAX_BYTES = 1 << 30


def read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > TEXT_MAX_BYTES:
            raise SPJError(f"{path}: {size} bytes, more than the {TEXT_MAX_BYTES} spj-edge reads from one text file")
        raw = path.read_bytes()
    except OSError as e:
        raise SPJError(f"{path}: cannot read ({e.strerror})") from None
    if b"\0" in raw:
        raise SPJError(f"{path}: binary file (contains NUL bytes), expected UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SPJError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None


def read_texts(paths: list[str | Path]) -> dict[Path, str]:
    """Every file's text; files that hold only white space are left out, and no text at all is an error."""
    texts = {f: read_text(f) for f in find_text_files(paths)}
    texts = {f: t for f, t in texts.items() if t.strip()}
    if not texts:
        raise SPJError(f"{', '.join(map(str, paths))}: no text found (all files are empty)")
    return texts


def split_documents(text: str) -> list[str]:
    """Paragraphs (blank-line separated), each keeping its trailing separator, so they concatenate to the text."""
    return [m.group(0) for m in re.finditer(r".+?(?:\n\s*\n|$)", text, flags=re.S) if m.group(0)]


def tokenize_corpus(texts: list[str], tokenizer: Tokenizer | TextTokenizer) -> np.ndarray:
    """One stream of paragraphs, each framed as the tokenizer frames a prompt and ended by its EOS, the way generation
    starts and ends: <bos> paragraph <eos> <bos> paragraph <eos> … for our presets."""
    docs = [d for t in texts for d in split_documents(t)]
    return np.concatenate([np.array(ids, dtype=np.int64)
                           for ids in TextTokenizer.of(tokenizer).encode_documents(docs)])


def calibration_split(paths: list, tokenizer: Tokenizer,
                      held_out_fraction: float = CALIB_HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """`--calib` text, split as every stage splits it: each file tokenized as training sees text (tokenize_corpus),
    its last `held_out_fraction` held out. Returns the calibration stream and the held-out stream."""
    heads, tails = [], []
    for text in read_texts(paths).values():
        ids = tokenize_corpus([text], tokenizer)
        cut = int(len(ids) * (1 - held_out_fraction))
        heads.append(ids[:cut])
        tails.append(ids[cut:])
    return np.concatenate(heads), np.concatenate(tails)


@dataclass
class Dataset:
    """Windows of block_size + 1 tokens (inputs and targets shifted by one), split into train and held-out."""

    train: np.ndarray  # [n_train, block_size + 1]
    val: np.ndarray  # [n_val, block_size + 1]
    fingerprint: str  # sha256 of the token stream and split: a resumed run must see the same data

    def train_batch(self, seed: int, first: int, size: int) -> np.ndarray:
        """Samples first .. first+size of the infinite sequence of epochs, each a fresh seeded permutation."""
        n = len(self.train)
        rows = []
        for k in range(first, first + size):
            epoch, index = divmod(k, n)
            rows.append(self._permutation(seed, epoch)[index])
        return self.train[rows]

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_perm_cache", {})
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(len(self.train))
        return cache[epoch]


def windows(stream: np.ndarray, block_size: int) -> np.ndarray:
    n = len(stream) // (block_size + 1)
    return stream[: n * (block_size + 1)].reshape(n, block_size + 1)


def spaced_windows(stream: np.ndarray, length: int, count: int) -> list[np.ndarray]:
    """Up to `count` non-overlapping windows spread evenly over the stream."""
    available = len(stream) // length
    picks = np.linspace(0, available - 1, num=min(count, available)).astype(int) if available else []
    return [stream[i * length:(i + 1) * length] for i in np.unique(picks)]


def build_dataset(train_stream: np.ndarray, block_size: int, seed: int, val_fraction: float,
                  val_stream: np.ndarray | None = None, source: str = "data") -> Dataset:
    """Cut the stream into windows. Held-out windows come from `val_stream` when given, else a seeded random
    `val_fraction` of the windows (at least one) is set aside."""
    blocks = windows(train_stream, block_size)
    min_blocks = 1 if val_stream is not None else 2
    if len(blocks) < min_blocks:
        raise SPJError(f"{source}: too little text ({len(train_stream)} tokens) for windows of {block_size + 1} "
                       f"tokens; give more text or a smaller context")
    if val_stream is not None:
        train, val = blocks, windows(val_stream, block_size)
        if len(val) == 0:
            raise SPJError(f"held-out data: too little text ({len(val_stream)} tokens) for one window")
    else:
        order = np.random.default_rng(seed).permutation(len(blocks))
        n_val = min(max(1, round(len(blocks) * val_fraction)), len(blocks) - 1)
        val, train = blocks[np.sort(order[:n_val])], blocks[np.sort(order[n_val:])]
    digest = hashlib.sha256(train.tobytes())
    digest.update(val.tobytes())
    return Dataset(train=train, val=val, fingerprint=digest.hexdigest())
