"""The one step loop for any graph of the ONNX contract (contract.py): what the device runtime generates with, and what
the toolchain's export check, quantizer, eval of an export and speed figures run (spj_edge.onnx_lm opens a graph for
them). Torch-free: the runtime imports it.

A Step is one generation's IOBinding. The cache never leaves onnxruntime: each step's `present.*` outputs are OrtValues
that the binding binds as the next step's `past_key_values.*` inputs, with no copy through numpy. Where the graph's
attention is GroupQueryAttention (a fused export, `spj.graph` "fused" in its metadata) and the step knows how long the
generation will be, each layer's cache is instead one buffer of that length bound as both its past input and its present
output: GroupQueryAttention then writes the new positions into it in place (onnxruntime-genai's
`past_present_share_buffer`), where otherwise every step zeroes and copies the whole cache into a new present. The
small inputs (ids, mask, positions) are numpy buffers bound in place, and a graph that computes the last position's
logits only (a package's, `"logits": "last"` in spj.json) writes them into one buffer that lives for the whole
generation.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Collection, Iterator, Sequence

import numpy as np
import onnxruntime as ort

from .. import contract
from ..errors import SPJError
from ..sampling import Sampler

MADV_COLLAPSE = 25  # Linux 6.1's; Python's mmap module does not name it


def open_session(model: bytes | str, threads: int) -> ort.InferenceSession:
    """A CPU session of `model` (a path, or the graph's bytes); threads 0 is onnxruntime's default."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: warnings (a quantized graph's notices) would break one-line output
    before = anonymous_mappings()
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    if isinstance(model, str):
        release_weight_pages(Path(f"{model}.data"))  # where every stage puts a graph's external weights
    weights_on_huge_pages(before)
    return session


def anonymous_mappings() -> dict[int, int]:
    """This process's private anonymous memory (malloc's heap and its mappings): start -> end of each; Linux only."""
    maps = Path("/proc/self/maps")
    found = {}
    for line in maps.read_text().splitlines() if maps.is_file() else []:
        head = line.split()  # "start-end perms offset major:minor inode [path]"
        if head[1] == "rw-p" and head[4] == "0" and (len(head) == 5 or head[5] == "[heap]"):
            start, end = (int(a, 16) for a in head[0].split("-"))
            found[start] = end
    return found


def weights_on_huge_pages(before: dict[int, int]) -> int:
    """Moves the memory onnxruntime allocated since `before` (anonymous_mappings) onto transparent huge pages;
    returns its bytes.

    onnxruntime packs every MatMul's weights into buffers of its own, which malloc maps in 4 KB pages; a decode step
    streams all of them, and on 2 MB pages most of the TLB misses go. Measured on a 2-core AMD EPYC, three pairs of
    processes interleaved, median decode tokens/s: SmolLM2-135M +10 % float32, +3 % / +13 % int8 and +8 % / +5 % int4
    at 1 / 2 threads, `small` +15 % / +24 % / +7 % at 1 thread; the resident set the same. Where THP is `madvise`
    (Ubuntu's default and this machine's), nothing goes on huge pages unless asked: madvise HUGEPAGE marks the ranges,
    and COLLAPSE (Linux 6.1 on) moves what is there now, at load (a new process's first token with small int8: 0.30 s).
    Where either is refused (THP off, an older kernel, no free huge pages), the memory stays as it was."""
    size_file = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
    if not before or not size_file.is_file():
        return 0
    huge = int(size_file.read_text())
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved = 0
    for start, end in _new_parts(before, anonymous_mappings()):
        start, end = -(-start // huge) * huge, end // huge * huge  # the whole huge pages inside
        if end > start and madvise(start, end - start, mmap.MADV_HUGEPAGE) == 0 \
                and madvise(start, end - start, MADV_COLLAPSE) == 0:
            moved += end - start
    return moved


def _new_parts(before: dict[int, int], after: dict[int, int]) -> Iterator[tuple[int, int]]:
    """The ranges of `after`'s mappings that none of `before`'s held: the kernel merges a new mapping with one beside
    it, and the heap grows."""
    for start, end in after.items():
        for old_start, old_end in sorted((s, e) for s, e in before.items() if s < end and start < e):
            if old_start > start:
                yield start, old_start
            start = max(start, old_end)
        if start < end:
            yield start, end


def release_weight_pages(weights: Path) -> int:
    """Drops from this process's page tables the clean pages it maps of the file `weights`; returns their bytes.

    onnxruntime maps a graph's external weights and reads them once to pack them into its own layout, but keeps some
    tensors it has copied (on x86 the scales of every MatMulNBits, which its int8 kernels read from the packed copy),
    and the pages it read stay counted in the resident set though nothing reads them again: 156 MB of a 1.1B int4
    package. A clean page of a file mapping can go (madvise DONTNEED) without changing what the memory holds: the
    page cache keeps it, and a later read faults it back from the same file. A mapping with a page written to (a
    private copy, counted as Anonymous) is left alone. Linux only (/proc/self/smaps); elsewhere nothing is dropped."""
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file() or not weights.is_file():
        return 0
    info = weights.stat()  # through the links of a pinned package folder, to the file itself
    file = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    mappings, fields = [], None  # fields: the current mapping's, when it maps the file
    for line in smaps.read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:  # "start-end perms offset major:minor inode [path]"
            major, minor = (int(part, 16) for part in head[3].split(":"))
            fields = {} if (major, minor, int(head[4])) == file else None
            if fields is not None:
                mappings.append((*(int(a, 16) for a in head[0].split("-")), fields))
        elif fields is not None and line.endswith(" kB"):
            fields[head[0].rstrip(":")] = int(head[1])
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, fields in mappings:
        if fields.get("Rss") and not fields.get("Anonymous"):  # Private_Dirty also counts pages not yet on disk
            if madvise(start, end - start, mmap.MADV_DONTNEED) == 0:
                released += fields["Rss"] * 1024
    return released


def unpadded_inputs(ids: np.ndarray, cached: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask and position_ids for the rows `ids` [batch, n] after `cached` positions, no row
    padded."""
    batch, n = ids.shape
    positions = np.tile(np.arange(cached, cached + n, dtype=np.int64), (batch, 1))
    return np.asarray(ids, np.int64), np.ones((batch, cached + n), np.int64), positions


class Decoder:
    """An onnxruntime session of a graph of the contract, and the loops that step it: generation (`decode`,
    `continuation`) and teacher forcing (`logits`). One Decoder serves any number of threads at once: each Step has
    its own binding and cache."""

    def __init__(self, session: ort.InferenceSession, inputs: list[contract.TensorSpec],
                 outputs: list[contract.TensorSpec], context: int, where: str, last_logits_only: bool = False):
        """`inputs` and `outputs` are contract.inputs and contract.outputs for the graph's shape; `where` names the
        graph in errors; `last_logits_only`: the graph's logits are the last position's, [batch, 1, vocab]."""
        self.session, self.inputs, self.outputs = session, inputs, outputs
        self.context, self.where, self.last_logits_only = context, where, last_logits_only
        # The plain graph's attention concatenates past and new positions into a new tensor: it cannot share.
        self.shares_cache = session.get_modelmeta().custom_metadata_map.get("spj.graph") == "fused"

    def step(self, batch: int, cache: Sequence[np.ndarray] | None = None, extra_outputs: Sequence[str] = (),
             capacity: int | None = None) -> Step:
        return Step(self, batch, cache, extra_outputs, capacity)

    def decode(self, rows: list[list[int]], steps: int, samplers: list[Sampler], pad_id: int = 0
               ) -> Iterator[list[int]]:
        """Yield each step's next id per row, for `steps` steps or until the caller stops asking: the prompts `rows`
        (left-padded with `pad_id` to the longest, masked) in one step, then one id a row a step through the cache."""
        if not steps:
            return
        batch, width = len(rows), max(map(len, rows))
        ids = np.full((batch, width), pad_id, np.int64)
        mask = np.ones((batch, width + steps), np.int64)  # the generated tokens are all real; the padding is not
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = row
            mask[r, :width - len(row)] = 0
        positions = np.tile(np.arange(width, dtype=np.int64), (batch, 1))  # padding counted: contract.inputs
        histories = [list(row) for row in rows]
        forward = self.step(batch, capacity=width + steps)
        logits = forward(ids, mask[:, :width], positions)
        token, position = np.empty((batch, 1), np.int64), positions[:, -1:] + 1
        for step in range(steps):
            if step:
                logits = forward(token, mask[:, :width + step], position)
                position += 1
            for r, (sample, history) in enumerate(zip(samplers, histories)):
                token[r, 0] = sample(logits[r, -1], history)
                history.append(int(token[r, 0]))
            yield token[:, 0].tolist()

    def continuation(self, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler, eos: Collection[int] = ()
                     ) -> Iterator[int]:
        """The new ids after `prompt_ids` (batch 1), for `max_new_tokens` or to the end of the context, ending before
        an id of `eos`."""
        steps = min(max_new_tokens, self.context - len(prompt_ids))
        for (token,) in self.decode([prompt_ids], steps, [sampler]):
            if token in eos:
                return
            yield token

    def logits(self, windows: np.ndarray, one_token_a_step: bool = False) -> np.ndarray:
        """Logits [batch, length, vocab] for the token after every prefix of each row of `windows` [batch, length],
        from an empty cache: the whole windows in one step, or one token a step through the cache as generation
        computes them (the only way for a graph that gives the last position's logits only)."""
        if not one_token_a_step:
            return self.step(len(windows)).extend(windows)
        step = self.step(len(windows), capacity=windows.shape[1])
        spec = self.outputs[0]
        logits = np.empty(_shape(spec, *windows.shape), spec.dtype)
        for t in range(windows.shape[1]):  # each into place: a sliced graph's step overwrites the same buffer
            logits[:, t] = step.extend(windows[:, t:t + 1])[:, -1]
        return logits

    def window_logits(self, window: np.ndarray) -> np.ndarray:
        """Logits [length, vocab] for every position of one token window: what the quantizer's gate scores."""
        return self.logits(window[None])[0]


class Step:
    """One generation's IOBinding: a forward step, after which the outputs `present.*` are bound as the inputs
    `past_key_values.*` of the next step."""

    def __init__(self, decoder: Decoder, batch: int, cache: Sequence[np.ndarray] | None = None,
                 extra_outputs: Sequence[str] = (), capacity: int | None = None):
        """The first step reads an empty cache, or `cache`: one [batch, kv_heads, length, head_dim] array per past
        input, for a batch whose rows changed between steps (serve's continuous batching), read in place.
        `extra_outputs`: graph outputs besides the contract's that each step fetches too (see `values`).
        `capacity`: the most positions the steps will cache, where known: a graph that can (Decoder.shares_cache)
        then keeps the cache in buffers of that length, written in place."""
        self.session, self.where = decoder.session, decoder.where
        self.binding = decoder.session.io_binding()
        # contract.inputs lists input_ids, attention_mask, position_ids, then the cache in the order of outputs[1:].
        self.ids, self.mask, self.positions = (s.name for s in decoder.inputs[:3])
        self.past = [s.name for s in decoder.inputs[3:]]
        past_specs = decoder.inputs[3:]
        if cache is None:
            cache = [np.zeros(_shape(spec, batch, 0), spec.dtype) for spec in past_specs]
        self.cached = cache[0].shape[2]  # positions the cache holds: `extend` continues after them
        self.capacity = capacity if decoder.shares_cache and capacity is not None else None
        # The output bound first comes first in get_outputs(); rebinding a name keeps its place. An extra output may
        # be the contract's too (the fused graph's LM head MatMul writes `logits`): bound once.
        logits = decoder.outputs[0]
        self.output_names = list(dict.fromkeys([s.name for s in decoder.outputs] + list(extra_outputs)))
        # self.dynamic: the outputs onnxruntime allocates anew each step (their shapes change), bound again before each
        if decoder.last_logits_only:
            self.logits = np.empty(_shape(logits, batch, 1), logits.dtype)
            self.binding.bind_ortvalue_output(logits.name, ort.OrtValue.ortvalue_from_numpy(self.logits))
            self.dynamic = []
        else:
            self.logits = None
            self.binding.bind_output(logits.name)
            self.dynamic = [logits.name]
        presents, extras = self.output_names[1:1 + len(self.past)], self.output_names[1 + len(self.past):]
        if self.capacity is None:
            for name, value in zip(self.past, cache):
                self.binding.bind_cpu_input(name, value)
            self.dynamic += presents
        else:
            # zeros: pages past the positions written are never touched, so they cost no memory
            self.buffers = [np.zeros(_shape(spec, batch, self.capacity), spec.dtype) for spec in past_specs]
            for name, present, buffer, prefix in zip(self.past, presents, self.buffers, cache):
                buffer[:, :, :self.cached] = prefix
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                self.binding.bind_ortvalue_input(name, value)
                self.binding.bind_ortvalue_output(present, value)
        self.dynamic += extras

    def __call__(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Logits [batch, sequence, vocab] for `ids` [batch, sequence] after the cached positions (sequence 1 where the
        graph gives the last position's only: one buffer, which the next step overwrites). `mask` covers the cached
        positions and `ids`."""
        binding = self.binding
        if self.capacity is not None and mask.shape[1] > self.capacity:
            raise SPJError(f"{self.where}: a step to {mask.shape[1]} positions, past the {self.capacity} its cache "
                           "was made for")
        # bound in place, so in C order: no copy for those that are already (a mask's slice at batch 1 is)
        binding.bind_cpu_input(self.ids, np.ascontiguousarray(ids))
        binding.bind_cpu_input(self.mask, np.ascontiguousarray(mask))
        binding.bind_cpu_input(self.positions, np.ascontiguousarray(positions))
        for name in self.dynamic:
            binding.bind_output(name)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:  # onnxruntime's own exception types, with multi-line messages
            raise SPJError(f"{self.where}: onnxruntime failed ({str(e).splitlines()[0][:200]})") from None
        self.cached = mask.shape[1]
        if self.capacity is not None and self.logits is not None:
            return self.logits  # nothing to fetch: the cache and the logits were written in place
        logits, *present = binding.get_outputs()
        if self.capacity is None:
            for name, value in zip(self.past, present):  # the extra outputs, after the presents, are left out
                binding.bind_ortvalue_input(name, value)
        return logits.numpy() if self.logits is None else self.logits

    def extend(self, ids: np.ndarray) -> np.ndarray:
        """Logits for the rows `ids` [batch, n] after the cached positions, no row padded."""
        return self(*unpadded_inputs(ids, self.cached))

    def cache(self) -> list[np.ndarray]:
        """After a step: the cache the next step reads, as arrays in the order of the past inputs."""
        if self.capacity is not None:
            return [buffer[:, :, :self.cached].copy() for buffer in self.buffers]
        return [value.numpy() for value in self.binding.get_outputs()[1:1 + len(self.past)]]

    def values(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """After a step: the outputs `names` (the contract's or the extra ones), as arrays."""
        outputs = dict(zip(self.output_names, self.binding.get_outputs()))
        return {name: outputs[name].numpy() for name in names}


def _shape(spec: contract.TensorSpec, batch: int, length: int) -> tuple[int, ...]:
    """The spec's shape with its batch axis `batch` and its other dynamic axis `length`."""
    return tuple(batch if d == contract.BATCH else length if isinstance(d, str) else d for d in spec.dims)
