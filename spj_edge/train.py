"""Training: AdamW with warmup and cosine decay, gradient clipping, mixed precision, gradient accumulation, periodic
held-out validation, atomic checkpoints and exact resume. Under `torchrun` the same loop runs as DDP (gloo on CPU,
NCCL on GPUs): every rank takes its own slice of each global batch, so N processes × batch B step like one process
with batch N·B.

`fit` is the loop, shared with distillation (which passes its own loss); `train` prepares data, tokenizer and model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from .artifact import read_json
from .checkpoint import load_model, save_checkpoint
from .data import Dataset, build_dataset, tokenize_documents
from .errors import SPJError
from .metrics import bits_per_byte, perplexity
from .config import SPJConfig
from .model import Transformer
from .options import SourceOptions, TrainOptions
from .outputs import check_output, staged_dir, write_json
from .prepare import is_prepared, load_prepared
from .sources import read_corpus
from .tables import print_summary
from .tokenizer import (TextTokenizer, check_matches_model, load_tokenizer, special_token_ids, specials_as_text,
                        token_byte_lengths, train_tokenizer)

STATE_DIR = "train_state"  # inside a checkpoint: what --resume needs beyond the weights


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware has it (CPUs with AVX512-BF16/AMX, GPUs from Ampere on), fp16 on older GPUs."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits, _ = model(inputs)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def heldout_metrics(model: Transformer, windows: np.ndarray, byte_lengths: torch.Tensor, batch_size: int,
                    amp_dtype: torch.dtype | None = None) -> dict:
    """Loss and perplexity per token, and bits per byte (metrics.py) of the held-out windows, scoring as eval and
    the quantizer's gate do (metrics.figures) only the targets that stand for text bytes, not <bos>/<eos>."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, tokens, n_bytes = 0.0, 0, 0
    for start in range(0, len(windows), batch_size):
        batch = torch.from_numpy(windows[start:start + batch_size]).to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, _ = model(inputs)
        lengths = byte_lengths[targets.cpu()].flatten()
        text = (lengths > 0).to(device)
        nll += F.cross_entropy(logits.flatten(0, 1).float()[text], targets.flatten()[text], reduction="sum").item()
        tokens += int(text.sum())
        n_bytes += int(lengths.sum())
    model.train(was_training)
    return {"loss": nll / tokens, "perplexity": perplexity(nll, tokens), "bits_per_byte": bits_per_byte(nll, n_bytes),
            "tokens": tokens, "bytes": n_bytes}


# --- processes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Processes:
    """This process's place in a torchrun job (rank 0 of 1 when run plainly)."""

    rank: int
    world: int
    device: torch.device

    @classmethod
    def start(cls) -> Processes:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), world, device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# --- resumable state: safetensors + JSON, never a pickle ---------------------------------------------------------------
STATE_KEYS = ("step", "options", "data_fingerprint", "world_size", "history", "param_groups", "optimizer_scalars",
              "grad_scaler")  # what save_train_state writes to state.json


def save_train_state(directory: Path, optimizer, scaler, step: int, history: list, opts: TrainOptions,
                     fingerprint: str, world: int):
    directory.mkdir(parents=True)
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(directory / "state.json", {
        "step": step, "options": dataclasses.asdict(opts), "data_fingerprint": fingerprint, "world_size": world,
        "history": history, "param_groups": state["param_groups"], "optimizer_scalars": scalars,
        "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
    })


def load_train_state(checkpoint: Path, optimizer, scaler, opts: TrainOptions, fingerprint: str, world: int):
    directory = checkpoint / STATE_DIR
    state = read_json(directory / "state.json")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:  # a damaged or hand-edited file: say so, rather than a KeyError
        raise SPJError(f"{directory / 'state.json'}: incomplete train state, it lacks {', '.join(missing)}")
    if state["options"] != dataclasses.asdict(opts):
        changed = [k for k, v in dataclasses.asdict(opts).items() if state["options"].get(k) != v]
        raise SPJError(f"{checkpoint}: cannot resume with different settings ({', '.join(changed)} changed)")
    if state["data_fingerprint"] != fingerprint:
        raise SPJError(f"{checkpoint}: cannot resume on different data (the token stream differs)")
    if state["world_size"] != world:
        raise SPJError(f"{checkpoint}: ran with {state['world_size']} processes, now {world}: the batches would differ")
    try:
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except Exception as e:
        raise SPJError(f"{directory / 'optimizer.safetensors'}: corrupt ({str(e).splitlines()[0][:100]})") from None
    slots: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *state["optimizer_scalars"].items()]:
        index, key = flat.split(".", 1)
        slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    if state["grad_scaler"]:
        scaler.load_state_dict(state["grad_scaler"])
    return state["step"], state["history"]


# --- progress, warnings, Ctrl-C ---------------------------------------------------------------------------------------
def remaining_seconds(timed_steps: int, timed_seconds: float, steps_left: int) -> float | None:
    """The time the steps left take at the pace of the steps timed so far; None before any is timed."""
    return steps_left * timed_seconds / timed_steps if timed_steps else None


class Progress:
    """The step bar. Its clock starts when the first step of this run ends: that step also pays for torch.compile
    (about a minute on a CPU), first allocations and lazy initialisation, and timed with the rest it put hours on
    the estimate (8:47:22 for a 10-minute run)."""

    def __init__(self, stage: str, total: int, initial: int, tokens_per_step: int, *, compiling: bool, enabled: bool,
                 clock: Callable[[], float] = time.perf_counter, file=None):
        self.stage, self.total, self.step, self.clock = stage, total, initial, clock
        self.tokens_per_step, self.file = tokens_per_step, file or sys.stderr
        self.warm: tuple[float, int] | None = None  # (time, step) at the end of the first step
        # A log file gets a line every 15 s, not a flood; the bar's own estimate is replaced by ours.
        self.bar = tqdm(total=total, initial=initial, desc=f"{stage} (compiling…)" if compiling else stage,
                        unit="step", disable=not enabled, dynamic_ncols=True, file=self.file,
                        mininterval=0.2 if self.file.isatty() else 15,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def advance(self, **postfix):
        """One step done; `postfix`: figures to show after the estimate."""
        self.step += 1
        if self.warm is None:
            self.warm = (self.clock(), self.step)
            self.bar.set_description_str(self.stage, refresh=False)
        eta, (steps, seconds) = self.eta(), self.timed()
        self.bar.set_postfix(eta="?" if eta is None else tqdm.format_interval(eta),
                             tok_s=f"{steps * self.tokens_per_step / seconds:,.0f}" if steps and seconds else "?",
                             **postfix, refresh=False)
        self.bar.update(1)

    def timed(self) -> tuple[int, float]:
        """Steps done, and seconds passed, since the end of the first step."""
        if self.warm is None:
            return 0, 0.0
        return self.step - self.warm[1], self.clock() - self.warm[0]

    def eta(self) -> float | None:
        return remaining_seconds(*self.timed(), self.total - self.step)

    def write(self, line: str):
        if not self.bar.disable:  # to the bar's stream, stderr: tqdm's own default is stdout, the command's output
            tqdm.write(line, file=self.file)

    def close(self):
        self.bar.close()


DEFAULT_WARMUP_LIMIT = 2000  # steps: about the longest warmup in common use (nanoGPT's, Llama's)


def warmup_warning(opts: TrainOptions) -> str | None:
    """A default warmup (5 % of the steps) far longer than any run needs keeps the learning rate near zero: 10¹²
    steps would train at ~5e-11 for as long as anyone waits."""
    if opts.warmup_steps != -1 or opts.warmup <= DEFAULT_WARMUP_LIMIT:
        return None
    return (f"spj-edge: warning: the default warmup is 5 % of --steps: the learning rate climbs from "
            f"{lr_at(0, opts):.1e} to {opts.lr:g} over {opts.warmup:,} steps; --warmup-steps N sets a shorter one "
            f"(a few hundred to {DEFAULT_WARMUP_LIMIT:,} is usual)")


class StopRequest:
    """Ctrl-C (SIGINT) during the loop asks to stop after the current step, so that what is saved is a whole step:
    an interrupt inside optimizer.step() would save some weights updated and the others not. A second Ctrl-C stops
    at once. Installed only where SIGINT has Python's default handler and only in the main thread; under torchrun
    every rank gets the signal at its own point of the loop, so Ctrl-C stops at once there (the ranks could not
    agree on a last step)."""

    def __init__(self, enabled: bool):
        self.enabled, self.requested, self.previous = enabled, False, None

    def __enter__(self) -> StopRequest:
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame):
        signal.signal(signal.SIGINT, self.previous)
        self.requested = True
        # os.write, not print: the handler may run in the middle of a print to the same stream
        os.write(2, "\ninterrupted: stopping after this step (Ctrl-C again: at once)\n".encode())

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def resume_command(verb: str) -> str | None:
    """The command line of this process plus --resume, if it is `spj-edge VERB ...` (not the Python API, nor the
    demo, which trains through the library)."""
    program, args = Path(sys.argv[0]), sys.argv[1:]
    if program.parent.name == "spj_edge" and program.suffix == ".py":  # python -m spj_edge[.cli]
        launcher = [sys.executable, "-m", "spj_edge" if program.stem == "__main__" else f"spj_edge.{program.stem}"]
    elif program.stem == "spj-edge":
        launcher = [sys.argv[0]]
    else:
        return None
    if not args or args[0] != verb:
        return None
    return shlex.join([*launcher, *args, *([] if "--resume" in args else ["--resume"])])


def interrupted_message(stage: str, step: int, steps: int, out: Path | None) -> str:
    where = f"{stage}: interrupted at step {step:,} of {steps:,}"
    if out is None:
        return f"{where}; nothing saved (no output directory)"
    command = resume_command(stage)
    how = f"continue it with: {command}" if command else "resume=True with the same settings continues it"
    return f"{where}; saved a checkpoint with its train state in {out}; {how}"


# --- the loop -------------------------------------------------------------------------------------------------------
LossFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fit(model: Transformer, tokenizer: Tokenizer, dataset: Dataset, opts: TrainOptions, out: Path | None,
        procs: Processes, *, loss_fn: LossFn = lm_loss, resume: bool = False, stage: str = "train",
        report_extra: dict | None = None) -> dict:
    """Run the optimisation; write checkpoints (with their train state) to `out` on rank 0. Returns the report."""
    model.to(procs.device).train()
    amp_dtype = autocast_dtype(opts.precision, procs.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opts.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=opts.lr, betas=(0.9, 0.95), eps=1e-8)
    scaler = torch.amp.GradScaler(procs.device.type, enabled=amp_dtype == torch.float16)
    step, history = 0, []
    if resume:
        step, history = load_train_state(out, optimizer, scaler, opts, dataset.fingerprint, procs.world)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if procs.world > 1 else model
    step_model = torch.compile(ddp_model) if opts.compile else ddp_model
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer, model.config.vocab_size))
    block = dataset.block_size
    global_batch = opts.batch_size * opts.grad_accum * procs.world
    val_windows = dataset.val[: opts.eval_windows]

    def checkpoint(report: dict):
        if procs.main and out is not None:
            with staged_dir(out) as tmp:
                save_checkpoint(tmp, model, tokenizer, report)
                save_train_state(tmp / STATE_DIR, optimizer, scaler, step, history, opts, dataset.fingerprint,
                                 procs.world)
        procs.barrier()

    def report(elapsed: float, tokens: int) -> dict:
        return {
            "stage": stage, "step": step, "steps": opts.steps, "parameters": sum(p.numel() for p in model.parameters()),
            "config": model.config.to_hf_dict(), "options": dataclasses.asdict(opts),
            "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
            "processes": procs.world, "device": str(procs.device), "train_windows": dataset.train_windows,
            "tokens_seen": dataset.tokens_seen(step * global_batch),
            "heldout": history[-1]["heldout"] if history else None, "history": history,
            "tokens_per_s": tokens / elapsed if elapsed else None, **(report_extra or {}),
        }

    def train_step() -> tuple[float, float, float]:
        """The optimizer step that follows `step`: its summed loss, gradient norm and learning rate."""
        lr = lr_at(step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(opts.grad_accum):
            first = step * global_batch + (micro * procs.world + procs.rank) * opts.batch_size
            batch = torch.from_numpy(dataset.train_batch(opts.seed, first, opts.batch_size)).to(procs.device)
            last_micro = micro == opts.grad_accum - 1
            sync = contextlib.nullcontext() if last_micro or procs.world == 1 else ddp_model.no_sync()
            with sync:
                with torch.autocast(procs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = loss_fn(step_model, batch[:, :-1], batch[:, 1:]) / opts.grad_accum
                scaler.scale(loss).backward()
            loss_sum += loss.item()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, lr

    if procs.main and step < opts.warmup and (warning := warmup_warning(opts)):
        print(warning, file=sys.stderr)
    progress = Progress(stage, opts.steps, step, global_batch * block, compiling=opts.compile, enabled=procs.main)
    started, tokens_done, start_step = time.perf_counter(), 0, step
    with StopRequest(enabled=procs.world == 1) as stop:
        while step < opts.steps:
            loss_sum, grad_norm, lr = train_step()
            step += 1
            tokens_done += global_batch * block
            elapsed = time.perf_counter() - started
            progress.advance(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")
            if step % opts.eval_every == 0 or step == opts.steps:
                metrics = heldout_metrics(model, val_windows, byte_lengths, opts.batch_size, amp_dtype)
                history.append({"step": step, "train_loss": loss_sum, "grad_norm": grad_norm, "lr": lr,
                                "elapsed_s": round(elapsed, 2), "heldout": metrics})
                if procs.main:
                    progress.write(f"step {step}: train loss {loss_sum:.3f}, held-out loss {metrics['loss']:.3f}, "
                                   f"ppl {metrics['perplexity']:.1f}, {metrics['bits_per_byte']:.3f} bits/byte")
            stopping = stop.requested and step < opts.steps
            if (opts.save_every and step % opts.save_every == 0) or step == opts.steps or stopping:
                checkpoint(report(elapsed, tokens_done))
            if stopping:
                progress.close()
                if procs.main:
                    print(interrupted_message(stage, step, opts.steps, out), file=sys.stderr)
                raise KeyboardInterrupt
    progress.close()
    elapsed = time.perf_counter() - started
    final = report(elapsed, tokens_done)
    if procs.main and step > start_step:
        heldout = final["heldout"]
        print_summary(f"{stage}: {out or 'in memory'}", [
            ("parameters", f"{final['parameters']:,}"), ("steps", step), ("precision", final["precision"]),
            ("tokens/s", f"{tokens_done / elapsed:,.0f}"), ("time", f"{elapsed:.1f} s"),
            ("held-out loss", heldout["loss"]), ("perplexity", heldout["perplexity"]),
            ("bits per byte", heldout["bits_per_byte"])])
    return final


def prepare_tokenizer(texts: list[str], tokenizer_path: str | Path | None, config: SPJConfig,
                      procs: Processes) -> Tokenizer:
    """The given tokenizer, or one trained on the data by rank 0 (BPE training is not guaranteed to be
    deterministic across processes, so the others receive rank 0's)."""
    if tokenizer_path is not None:
        tokenizer = load_tokenizer(tokenizer_path)
    else:
        serialized = train_tokenizer(texts, config.vocab_size).to_str() if procs.main else None
        tokenizer = specials_as_text(Tokenizer.from_str(procs.broadcast(serialized)))
    check_matches_model(tokenizer, config.vocab_size, str(tokenizer_path or "trained tokenizer"))
    return tokenizer


def prepared_directory(data: list) -> Path | None:
    """The directory `spj-edge prepare` wrote, if that is what `data` is; such a directory comes alone."""
    prepared = [Path(p) for p in data if is_prepared(p)]
    if prepared and len(data) > 1:
        raise SPJError(f"{prepared[0]}: prepared token shards are given alone as --data (prepare the other sources "
                       "into it)")
    return prepared[0] if prepared else None


def load_dataset(data: list, tokenizer: Tokenizer, block_size: int, opts: TrainOptions, val_data: list | None = None,
                 sources: SourceOptions = SourceOptions(), documents: list[str] | None = None) -> Dataset:
    """The windows of `data`: a prepared directory's shards, memory-mapped, or the documents of any other sources
    (`documents`, where the caller has read them already) tokenized in memory. Held out: `val_data`'s windows if
    given, else the prepared directory's held-out documents or a seeded `opts.val_fraction` of the windows."""
    val_stream = tokenize_documents(read_corpus(val_data, sources)[0], tokenizer) if val_data else None
    if (directory := prepared_directory(data)) is not None:
        return load_prepared(directory, TextTokenizer.of(tokenizer), block_size, opts.source_weights,
                             opts.eval_windows, val_stream)
    if opts.weights is not None:
        raise SPJError("--weights samples the sources of a prepared --data; run `spj-edge prepare` first")
    if documents is None:
        documents = read_corpus(data, sources)[0]
    return build_dataset(tokenize_documents(documents, tokenizer), block_size, opts.seed, opts.val_fraction,
                         val_stream, source=", ".join(map(str, data)))


def read_training_text(data: list, sources: SourceOptions,
                       procs: Processes) -> tuple[list[str] | None, dict | None]:
    """The documents to tokenize in memory and the bad records skipped, or (None, None) for a prepared directory
    (its report has them)."""
    if prepared_directory(data) is not None:
        return None, None
    documents, bad = read_corpus(data, sources)
    if bad["total"] and procs.main:
        print(f"spj-edge: warning: skipped {bad['total']:,} bad records (first: "
              f"{next(iter(bad['first_per_file'].values()))})", file=sys.stderr)
    return documents, bad


def check_resumable(out: Path | None) -> None:
    if out is None or not (out / STATE_DIR / "state.json").is_file():
        raise SPJError(f"{out}: nothing to resume (no {STATE_DIR}/state.json); run without --resume")


def train(config: SPJConfig, data: list, out: str | Path | None, opts: TrainOptions = TrainOptions(), *,
          tokenizer: str | Path | Tokenizer | None = None, val_data: list | None = None,
          sources: SourceOptions = SourceOptions(), resume: bool = False,
          overwrite: bool = False) -> tuple[Transformer, Tokenizer, dict]:
    """Train a model of `config` from scratch, or resume the run saved in `out`. `data`: a directory that
    `spj-edge prepare` wrote, or files of any format sources.py reads (tokenized in memory)."""
    out = Path(out) if out is not None else None
    procs = Processes.start()
    if resume:
        check_resumable(out)
    if out is not None:
        given_tokenizer = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None
        check_output(out, [*data, *(val_data or []), given_tokenizer], overwrite=overwrite, resume=resume)
    if resume:
        tokenizer = out / "tokenizer.json"
    elif tokenizer is None and (directory := prepared_directory(data)) is not None:
        tokenizer = directory / "tokenizer.json"  # the one it was prepared with
    procs.barrier()  # every rank has looked at `out` before rank 0 may write it
    documents, bad_records = read_training_text(data, sources, procs)
    if isinstance(tokenizer, Tokenizer):
        check_matches_model(tokenizer, config.vocab_size, "tokenizer")
    else:
        tokenizer = prepare_tokenizer(documents, tokenizer, config, procs)
    config = config.replace(**special_token_ids(tokenizer))
    dataset = load_dataset(data, tokenizer, config.max_position_embeddings, opts, val_data, sources, documents)
    if resume:
        model = load_model(out)
        if model.config != config:
            raise SPJError(f"{out}: cannot resume with a different model config")
    else:
        torch.manual_seed(opts.seed)
        model = Transformer(config)
    data_report = {"data": [str(p) for p in data], "val_data": [str(p) for p in val_data or []],
                   "tokenizer_vocab_size": tokenizer.get_vocab_size(), "bad_records": bad_records}
    report = fit(model, tokenizer, dataset, opts, out, procs, resume=resume, report_extra=data_report)
    return model, tokenizer, report
