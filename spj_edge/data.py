"""Text files → token stream → fixed-length training windows, with a held-out split that depends only on the seed.

Training reads windows through one interface, `Dataset`: per source, `Windows` over one in-memory stream (text
tokenized here) or over the memory-mapped shards of a prepared directory (prepare.py), and a `Mixture` that says which
source each sample of the run comes from. The batch of any step follows from the seed and the step alone, which is
what makes --resume exact and lets every torchrun rank read only its own windows."""
from __future__ import annotations

import hashlib
import json
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


def tokenizer_sha256(tokenizer: Tokenizer | TextTokenizer) -> str:
    """What makes the ids: vocabulary, merges and pre-processing (padding and truncation settings don't change them),
    hashed from tokenizer.json's canonical JSON. Token shards record it; training refuses shards of another."""
    spec = json.loads(tokenizer.to_str())
    essentials = {k: v for k, v in spec.items() if k not in ("padding", "truncation")}
    return hashlib.sha256(json.dumps(essentials, sort_keys=True).encode("utf-8")).hexdigest()


def tokenize_documents(documents: list[str], tokenizer: Tokenizer | TextTokenizer) -> np.ndarray:
    """One stream of documents, each framed as the tokenizer frames a prompt and ended by its EOS, the way generation
    starts and ends: <bos> document <eos> <bos> document <eos> … for our presets."""
    ids, _ = TextTokenizer.of(tokenizer).encode_documents(documents)
    return ids.astype(np.int64)


def tokenize_corpus(texts: list[str], tokenizer: Tokenizer | TextTokenizer) -> np.ndarray:
    """The texts' paragraphs as one stream of documents (tokenize_documents)."""
    return tokenize_documents([d for t in texts for d in split_documents(t)], tokenizer)


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


class Windows:
    """Training windows of block_size + 1 tokens, numbered in order across one or more [n, block_size + 1] arrays:
    the memory-mapped shards of a prepared directory, or one stream cut in memory. `take` copies out only the rows
    asked for, so a batch reads its windows' pages of a shard and nothing else."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0, *map(len, parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, rows: list[int]) -> np.ndarray:
        part = np.searchsorted(self.starts, rows, side="right") - 1
        return np.stack([self.parts[p][r - self.starts[p]] for p, r in zip(part, rows)]).astype(np.int64)


MIXTURE_PERIOD = 4096  # samples: the mixture's weights are kept to 1/4096


@dataclass(frozen=True)
class Mixture:
    """Which source each sample of a run comes from: a pattern of MIXTURE_PERIOD places repeated for ever, in which
    each place goes to the source furthest below its share so far (Megatron-LM's blending), so every stretch of the
    run holds the sources in their weights' proportions. The source of sample k, and how many samples that source
    gave before it, follow from k alone: a resumed run continues the sequence without replaying it."""

    pattern: np.ndarray  # [MIXTURE_PERIOD]: the source of each place
    ordinal: np.ndarray  # [MIXTURE_PERIOD]: the places of the same source before this one in the period
    per_period: np.ndarray  # [sources]: each source's places in a period

    @classmethod
    def of(cls, weights: list[float]) -> Mixture:
        share = np.asarray(weights, dtype=np.float64) / sum(weights)
        counts = np.zeros(len(share), dtype=np.int64)
        pattern, ordinal = np.empty(MIXTURE_PERIOD, dtype=np.int64), np.empty(MIXTURE_PERIOD, dtype=np.int64)
        for place in range(MIXTURE_PERIOD):
            source = int(np.argmax(share * (place + 1) - counts))
            pattern[place], ordinal[place] = source, counts[source]
            counts[source] += 1
        return cls(pattern, ordinal, counts)

    def locate(self, sample: int) -> tuple[int, int]:
        """(source, the sample's number among that source's samples)."""
        period, place = divmod(sample, MIXTURE_PERIOD)
        source = int(self.pattern[place])
        return source, period * int(self.per_period[source]) + int(self.ordinal[place])

    def counts(self, samples: int) -> np.ndarray:
        """Samples per source among the first `samples`."""
        periods, rest = divmod(samples, MIXTURE_PERIOD)
        return periods * self.per_period + np.bincount(self.pattern[:rest], minlength=len(self.per_period))


@dataclass
class Dataset:
    """Training windows per source, sampled in the mixture's proportions, and the held-out windows."""

    sources: dict[str, Windows]
    val: np.ndarray  # [n_val, block_size + 1]
    fingerprint: str  # sha256 of the tokens, the split and the mixture: a resumed run must see the same data
    mixture: Mixture

    @property
    def block_size(self) -> int:
        return self.val.shape[1] - 1

    @property
    def train_windows(self) -> int:
        return sum(map(len, self.sources.values()))

    def train_batch(self, seed: int, first: int, size: int) -> np.ndarray:
        """Samples first .. first+size of the run: each from the source the mixture gives, and within a source the
        infinite sequence of its epochs, each a fresh seeded permutation of its windows."""
        windows = list(self.sources.values())
        rows = []
        for k in range(first, first + size):
            source, number = self.mixture.locate(k)
            epoch, index = divmod(number, len(windows[source]))
            order = self._permutation(seed, source, epoch, len(windows[source]))
            rows.append(windows[source].take([order[index]]))
        return np.concatenate(rows)

    def tokens_seen(self, samples: int) -> dict[str, int]:
        """Tokens trained on per source in the first `samples` windows (each window's block_size inputs)."""
        return {name: int(n) * self.block_size for name, n in zip(self.sources, self.mixture.counts(samples))}

    def _permutation(self, seed: int, source: int, epoch: int, windows: int) -> WindowOrder:
        cache = self.__dict__.setdefault("_perm_cache", {})  # source → (epoch, its order)
        if cache.get(source, (None,))[0] != epoch:
            cache[source] = (epoch, WindowOrder(windows, (seed, source, epoch)))
        return cache[source][1]


class WindowOrder:
    """A seeded shuffle of range(n), each place computed when asked: a Feistel network over the smallest even number
    of bits that holds n, walked again from any result ≥ n until it lands below (a permutation of the larger range
    restricted to range(n) stays one). A stored permutation would hold 8 bytes a window: 2.4 GB for SlimPajama's
    627B tokens in windows of 2,049, 230 MB for the 7.5B of benchmarks/prepare_bench.py's largest corpus."""

    ROUNDS = 6

    def __init__(self, n: int, key: tuple[int, ...]):
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.round_keys = [int(k) for k in np.random.default_rng(key).integers(0, 1 << 62, self.ROUNDS)]

    def __getitem__(self, place: int) -> int:
        mask, x = (1 << self.half_bits) - 1, place
        while True:
            left, right = x >> self.half_bits, x & mask
            for key in self.round_keys:
                left, right = right, left ^ (_mix64(right ^ key) & mask)
            x = (left << self.half_bits) | right
            if x < self.n:
                return x


def _mix64(x: int) -> int:
    """SplitMix64's finalizer: every bit of x stirred into every bit of the result."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


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
    return Dataset(sources={"data": Windows([train])}, val=val, fingerprint=digest.hexdigest(),
                   mixture=Mixture.of([1.0]))
