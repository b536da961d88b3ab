"""Each stage's options as data, without torch: a frozen dataclass per stage whose fields carry their CLI flag's help
(and choices, type, nargs), so the CLI builds its flags, defaults and choices from them and each is written once; the
dataclass validates its values, whoever builds it. A runtime-only install (no torch) can still parse
`spj-edge --help`."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from .errors import SPJError
from .metrics import SCORED_WINDOW


def flag(default, help: str | None = None, **argparse_options):
    """A field that is also a CLI flag (`--field-name`): its help and whatever else argparse needs beyond the
    default, which is the field's."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_options})


def add_flags(parser: argparse.ArgumentParser, options: type) -> None:
    """One flag per field of the dataclass `options` made with `flag`, its default the field's default."""
    for field in dataclasses.fields(options):
        if "help" not in field.metadata:
            continue
        kwargs = dict(field.metadata)
        if isinstance(field.default, bool) and "action" not in kwargs:
            kwargs["action"] = "store_true"
        elif field.default is not None and "type" not in kwargs and "action" not in kwargs:
            kwargs["type"] = type(field.default)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name, default=field.default, **kwargs)


def from_flags(options: type, args: argparse.Namespace):
    """The dataclass `options` with the values of its flags in `args`."""
    return options(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options) if "help" in f.metadata})

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
IMPORT_DTYPES = ("float32", "bfloat16")  # what `spj-edge import` writes the dequantized weights as


@dataclass(frozen=True)
class TrainOptions:
    steps: int = flag(1000, "optimizer steps (default %(default)s)")
    batch_size: int = flag(16, "windows per micro-batch and process")
    grad_accum: int = flag(1, "micro-batches per optimizer step")
    lr: float = flag(3e-3, "peak learning rate (default %(default)s)")
    min_lr_ratio: float = 0.1  # the cosine decays to lr × this
    warmup_steps: int = flag(-1, "default: 5%% of the steps")  # -1: 5 % of the steps
    weight_decay: float = flag(0.1)
    grad_clip: float = flag(1.0)
    precision: str = flag("auto", "auto: bf16 where the CPU or GPU has it, fp16 on older GPUs, else fp32",
                          choices=PRECISIONS)
    seed: int = flag(1337)
    eval_every: int = flag(100, "steps between held-out evaluations")
    eval_windows: int = flag(64, "held-out windows per evaluation")
    save_every: int = flag(0, "steps between checkpoints (0: at the end)")
    val_fraction: float = flag(0.05)
    # torch.compile the training step: ~40 s to compile, then ~1.5× the tokens/s on a CPU
    compile: bool = flag(False, "torch.compile the model: slow start, faster steps")
    weights: str | None = flag(None, "a prepared --data: sample windows by source, NAME=W,... (sources not named are "
                                     "left out; default: in proportion to their tokens)", metavar="NAME=W,...")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "eval_windows"):
            if getattr(self, name) <= 0:
                raise SPJError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SPJError(f"--lr must be a positive number, got {self.lr}")
        if self.save_every < 0:
            raise SPJError(f"--save-every must be ≥ 0, got {self.save_every}")
        if self.warmup_steps < -1:
            raise SPJError(f"--warmup-steps must be ≥ 0 (or -1: 5 % of the steps), got {self.warmup_steps}")
        # A negative clip would flip the gradient's sign, a NaN decay turn every weight into NaN: refuse, don't train.
        if not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise SPJError(f"--grad-clip must be a positive number, got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise SPJError(f"--weight-decay must be a number ≥ 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise SPJError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.seed < 0:  # numpy's seeded permutations refuse negative seeds, with a bare ValueError
            raise SPJError(f"--seed must be an integer ≥ 0, got {self.seed}")
        if not 0 < self.val_fraction < 1:
            raise SPJError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.precision not in PRECISIONS:
            raise SPJError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.weights is not None:
            self.source_weights  # parses, or says what is wrong

    @property
    def source_weights(self) -> dict[str, float] | None:
        """--weights as {source: weight}; None: in proportion to each source's tokens."""
        if self.weights is None:
            return None
        weights = {}
        for item in self.weights.split(","):
            name, _, value = item.rpartition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not name or not (weight >= 0 and math.isfinite(weight)) or name in weights:
                raise SPJError(f"--weights: {item!r} is not NAME=W with a new source name and a weight ≥ 0")
            weights[name] = weight
        if not sum(weights.values()) > 0:
            raise SPJError("--weights: every weight is 0")
        return weights

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps >= 0 else max(1, self.steps // 20)


@dataclass(frozen=True)
class SourceOptions:
    """How records are read from JSON Lines and Parquet files (plain text needs none of this)."""
    text_field: str = flag("text", "JSON Lines / Parquet: the field (a.b for a nested one) holding each document's "
                                   "text (default %(default)s)")
    source_field: str = flag("meta.redpajama_set_name", "the field naming each document's source, where a record "
                                                        "has it (default %(default)s; else the file's name)")
    skip_bad_records: bool = flag(False, "skip and count records that are not JSON or lack a text field, "
                                         "instead of stopping at the first")

    def __post_init__(self):
        for name in ("text_field", "source_field"):
            if not getattr(self, name) or "" in getattr(self, name).split("."):
                raise SPJError(f"--{name.replace('_', '-')} must name a field (a or a.b), got "
                               f"{getattr(self, name)!r}")


@dataclass(frozen=True)
class PrepareOptions:
    workers: int = flag(1, "tokenizing processes (default %(default)s); the output is the same for any number")
    val_fraction: float = flag(0.01, "share of documents held out, chosen by a hash of their text (default "
                                     "%(default)s)")
    # 2**26 tokens: 128 MiB of uint16 a shard, one sequential file write at a time; tests write smaller ones
    shard_tokens: int = flag(1 << 26, "tokens per shard file (default %(default)s)")

    def __post_init__(self):
        if self.workers < 1:
            raise SPJError(f"--workers must be a positive integer, got {self.workers}")
        if not 0 <= self.val_fraction < 1:
            raise SPJError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise SPJError(f"--shard-tokens must be a positive integer, got {self.shard_tokens}")

@dataclass(frozen=True)
class EvalOptions:
    windows: int = flag(32, "scored windows per file, spread evenly (default %(default)s)")
    prompts: int = flag(16, "held-out prompts per file to continue (default %(default)s)")
    new_tokens: int = flag(32, "tokens per greedy continuation (default %(default)s)")
    window_tokens: int = SCORED_WINDOW  # or the context of the shorter model

    def __post_init__(self):
        for name, least in (("windows", 1), ("prompts", 0), ("new_tokens", 1), ("window_tokens", 2)):
            value = getattr(self, name)
            if value < least:
                where = "window" if name == "window_tokens" else f"--{name.replace('_', '-')}"
                raise SPJError(f"{where} {value}: must be ≥ {least}")


# Of each --calib file, the end (data.calibration_split): what prune and quantize measure their result on, never
# calibrate on.
CALIB_HELD_OUT = 0.2
QUANTIZE_MODES = ("static", "dynamic", "int4")
CALIBRATIONS = ("minmax", "percentile")  # each smoothed input's extremes, or a percentile of its calibration sample
# The gate's defaults per mode: int8 is held to ≤ 1 % more bits per byte, int4 to ≤ 3 %; agreement counts where the
# float model is confident (quantize.gate_failures says why).
GATE = {"static": (0.01, 0.97), "dynamic": (0.01, 0.97), "int4": (0.03, 0.90)}
CALIBRATION_PREFILL, CALIBRATION_DECODE = 32, 16  # tokens per calibration sample: a prompt, then cached steps


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str = flag("static", "int8 with calibration (static) or without (dynamic), or int4 weights "
                               "(default %(default)s)", choices=QUANTIZE_MODES)
    target: str = flag("auto", "a profile in exporters/: x86-vnni, x86, arm64 (default: this CPU)")
    calib_samples: int = flag(32, f"calibration samples, each a {CALIBRATION_PREFILL}-token prefill and "
                                  f"{CALIBRATION_DECODE} cached decode steps (default %(default)s)")
    calibration: str | None = flag(None, "default: the profile's", choices=CALIBRATIONS)
    per_channel: bool | None = flag(None, "per-channel weight scales (default: the profile's)",
                                    action=argparse.BooleanOptionalAction)
    smoothquant: float | None = flag(None, "static: SmoothQuant's alpha for every MatMul (default: each its own, from "
                                           "the calibration statistics; 0: off)", type=float, metavar="ALPHA")
    exclude: tuple[str, ...] = flag((), "keep these MatMuls in float, e.g. /lm_head/MatMul", type=str, nargs="+",
                                    metavar="NODE")
    auto_exclude: bool = flag(False, "keep the most sensitive MatMuls in float until the gate passes")
    max_bpb_increase: float | None = flag(None, "gate: relative (default 0.01 = 1%% for int8, 0.03 for int4)",
                                          type=float)
    min_agreement: float | None = flag(None, "gate: top-1 agreement with float32 where it is confident (default "
                                             "0.97 for int8, 0.90 for int4)", type=float)
    block_size: int = flag(32, "int4: weights per scale (default %(default)s)")
    int8_block_size: int | None = flag(None, "8-bit block weights: weights per scale (default: the profile's)",
                                       type=int)
    accuracy_level: int = flag(4, "int4: MatMulNBits compute type (4: int8)")
    keep_grids: bool = flag(True, "int4: weights block-quantized already (a GGUF's Q4_0, Q4_1, Q4_K, Q8_0) keep "
                                  "their grid instead of being rounded again (default: on)",
                            action=argparse.BooleanOptionalAction)
    force: bool = flag(False, "write a model that fails the gate, with a warning")
    external_data: bool | None = flag(None, "the weights in model.onnx.data beside the graph (default: when the graph "
                                            "passes 1 GiB)", action=argparse.BooleanOptionalAction)
    eval_windows: int = 24  # held-out windows of the gate
    measure: bool = True  # time float32 against the result
    # For experiments: anything but MatMul-only quantizes the attention path too and fails the gate; None: every type
    # onnxruntime can quantize, the recipe known to fail.
    op_types: tuple[str, ...] | None = ("MatMul",)

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        if self.op_types is not None:
            object.__setattr__(self, "op_types", tuple(self.op_types))
        if self.mode not in QUANTIZE_MODES:
            raise SPJError(f"--mode must be one of {', '.join(QUANTIZE_MODES)}, got {self.mode!r}")
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise SPJError(f"--calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if self.calib_samples <= 0 or self.eval_windows <= 0:
            raise SPJError("--calib-samples and --eval-windows must be positive")
        for flag_name, size in (("--block-size", self.block_size), ("--int8-block-size", self.int8_block_size)):
            if size is not None and (size < 16 or size & (size - 1)):
                raise SPJError(f"{flag_name} must be a power of two ≥ 16, got {size}")
        if self.smoothquant is not None and not (0 <= self.smoothquant < 1 and self.mode == "static"):
            raise SPJError(f"--smoothquant takes an alpha in [0, 1) and goes with --mode static, got "
                           f"{self.smoothquant}")
        bpb, agreement = GATE[self.mode]
        object.__setattr__(self, "max_bpb_increase", bpb if self.max_bpb_increase is None else self.max_bpb_increase)
        object.__setattr__(self, "min_agreement", agreement if self.min_agreement is None else self.min_agreement)
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise SPJError(f"--accuracy-level must be 0-4, got {self.accuracy_level}")
        if not (0 <= self.max_bpb_increase and 0 <= self.min_agreement <= 1):
            raise SPJError("--max-bpb-increase must be ≥ 0 and --min-agreement in [0, 1]")


@dataclass(frozen=True)
class PackageOptions:
    tar: bool = flag(False, "write OUT.tar.gz, one file to copy, instead of the directory")


IMPORTANCES = ("activation", "l1")
PRUNE_METHODS = ("structured", "magnitude")


@dataclass(frozen=True)
class PruneOptions:
    ffn_ratio: float = flag(0.0, "fraction of FFN channels to remove, in [0, 1)", required=True)
    head_ratio: float = flag(0.0, "fraction of query heads to remove in each KV group")
    importance: str = flag("activation", "activation: mean |activation| on --calib text (default); l1: weight norms")
    method: str = flag("structured", "structured (default), or magnitude: unstructured zeros, for comparison; "
                                     "shrinks nothing")
    multiple: int = flag(16, "round the FFN width up to a multiple of this")

    def __post_init__(self):
        for name in ("ffn_ratio", "head_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise SPJError(f"--{name.replace('_', '-')} must be in [0, 1) (the fraction to remove), got "
                               f"{getattr(self, name)}")
        if self.importance not in IMPORTANCES:
            raise SPJError(f"--importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.method not in PRUNE_METHODS:
            raise SPJError(f"--method must be one of {', '.join(PRUNE_METHODS)}, got {self.method!r}")
        if self.multiple < 1:
            raise SPJError(f"--multiple must be a positive integer, got {self.multiple}")


@dataclass(frozen=True)
class BenchOptions:
    prompt_tokens: int = flag(32, "random prompt ids, fresh each repetition (default %(default)s)")
    new_tokens: int = flag(128, "greedy new tokens, EOS ignored (default %(default)s)")
    repetitions: int = flag(5, "interleaved across the models (default %(default)s)")
    threads: int | None = flag(None, "onnxruntime and torch threads (default: the runtime's choice)", type=int)

    def __post_init__(self):
        checks = ((self.repetitions >= 1, f"repetitions must be ≥ 1, got {self.repetitions}"),
                  (self.prompt_tokens >= 1, f"prompt_tokens must be ≥ 1, got {self.prompt_tokens}"),
                  (self.new_tokens >= 2, f"new_tokens must be ≥ 2 (decode speed is timed between new tokens), "
                                         f"got {self.new_tokens}"),
                  (self.threads is None or self.threads >= 1, f"threads must be ≥ 1, got {self.threads}"))
        for ok, message in checks:
            if not ok:
                raise SPJError(message)
