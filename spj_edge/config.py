"""The model's shape, `SPJConfig`, and the presets: plain data, without torch, so that the stages that only read a
`config.json` (quantize, eval, bench, package) and a runtime-only install never import it."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import SPJError

# Real models have vocabularies and contexts of 256 K at most; far larger ones only allocate gigabytes (the RoPE
# tables, the embedding) before failing. The device runtime refuses the same sizes in a package's manifest.
LARGEST = {"vocab_size": 1 << 20, "max_position_embeddings": 1 << 20}
# Hugging Face's rope types that only rescale the rotary frequencies (no attention factor, no dependence on the
# sequence length), with the parameters each takes: the model and both graphs follow from its frequency table alone.
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class RopeScaling:
    """Hugging Face's `rope_scaling` (`rope_parameters` beyond rope_theta): `linear` divides every frequency by
    `factor`; `llama3` (Llama 3.1/3.2) divides the low ones, keeps the high ones and interpolates in between."""

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_hf_dict(cls, d: dict, source: str) -> RopeScaling | None:
        """None for plain RoPE; refused, naming the key, for any type or parameter the model does not implement."""
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_SCALINGS:
            raise SPJError(f"{source}: rope_scaling rope_type={rope_type!r} is not supported (supported: default, "
                           f"{', '.join(ROPE_SCALINGS)})")
        wanted = ROPE_SCALINGS[rope_type]
        unknown = sorted(set(d) - {"rope_type", "type", "rope_theta", *wanted})
        if unknown:
            raise SPJError(f"{source}: rope_scaling key {unknown[0]!r} is not supported for rope_type {rope_type!r}")
        missing = [key for key in wanted if d.get(key) is None]
        if missing:
            raise SPJError(f"{source}: rope_scaling of rope_type {rope_type!r} lacks {missing[0]!r}")
        scaling = cls(rope_type, **{key: d[key] for key in wanted})
        scaling.check(source)
        return scaling

    def check(self, source: str) -> None:
        for key in ROPE_SCALINGS[self.rope_type]:
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise SPJError(f"{source}: rope_scaling {key} must be a positive finite number, got {value!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise SPJError(f"{source}: rope_scaling high_freq_factor ({self.high_freq_factor}) must exceed "
                           f"low_freq_factor ({self.low_freq_factor})")

    def to_hf_dict(self) -> dict:
        return {"rope_type": self.rope_type, **{key: getattr(self, key) for key in ROPE_SCALINGS[self.rope_type]}}


@dataclass(frozen=True)
class SPJConfig:
    """The model's shape. Field names are `transformers.LlamaConfig`'s."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads, as in LlamaConfig
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    attention_bias: bool = False  # q, k, v and o projections with biases (Qwen-style Llama checkpoints)
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # as a preset's JSON or dataclasses.asdict spells it
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf_dict(self.rope_scaling, "model config"))
        if self.head_dim == 0 and self.num_attention_heads > 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SPJError(f"model config: {name} must be a positive integer, got {value!r}")
        for name, most in LARGEST.items():
            if getattr(self, name) > most:
                raise SPJError(f"model config: {name} must be ≤ {most}, got {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise SPJError(f"model config: {name} must be a positive finite number, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SPJError(f"model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                           f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise SPJError(f"model config: head_dim must be even for rotary embeddings, got {self.head_dim}")

    def replace(self, **changes) -> SPJConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attention = h * q * 2 + h * kv * 2 + ((q + 2 * kv + h) if self.attention_bias else 0)
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    # --- Hugging Face's config.json -----------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        scaling = self.rope_scaling.to_hf_dict() if self.rope_scaling else None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **fields,
            "hidden_act": "silu",
            "mlp_bias": False,
            "attention_dropout": 0.0,
            # transformers 5 reads rope_parameters, older releases and other tools rope_theta and rope_scaling
            "rope_scaling": scaling,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta},
            "dtype": "float32",
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config") -> SPJConfig:
        """Read a Llama-family config.json, refusing what this model can't represent."""
        arch = d.get("architectures") or []
        if d.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
            found = ", ".join(arch) or d.get("model_type") or "nothing"
            raise SPJError(f"{source}: architecture {found} is not supported (supported: LlamaForCausalLM)")
        unsupported = {
            "hidden_act": (d.get("hidden_act", "silu"), "silu"),
            "mlp_bias": (d.get("mlp_bias", False), False),
            "pretraining_tp": (d.get("pretraining_tp", 1), 1),  # Llama 2's sharded-matmul emulation
            "partial_rotary_factor": (d.get("partial_rotary_factor", 1.0), 1.0),
        }
        for key, (value, wanted) in unsupported.items():
            if value != wanted:
                raise SPJError(f"{source}: {key}={value!r} is not supported (only {wanted!r})")
        if not isinstance(d.get("attention_bias", False), bool):
            raise SPJError(f"{source}: attention_bias must be true or false, got {d['attention_bias']!r}")
        # transformers 5 writes rope_parameters (theta included); older releases rope_scaling beside rope_theta, and
        # transformers 5 lets rope_scaling win where a file has both: so does this.
        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise SPJError(f"{source}: rope_scaling must be a JSON object, got {rope!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        values["rope_scaling"] = RopeScaling.from_hf_dict(rope, source)
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            # Llama 3 lists several end-of-generation ids (generation_config.json holds them all, for whoever
            # generates); the config keeps the first, the one the model was trained to end a text with.
            if isinstance(values.get(key), list) and values[key]:
                values[key] = values[key][0]
        values.setdefault("num_key_value_heads", values.get("num_attention_heads", cls.num_key_value_heads))
        values.setdefault("head_dim", 0)
        try:
            return cls(**values)
        except TypeError as e:
            raise SPJError(f"{source}: {e}") from None


PRESET_DIRS = (Path(__file__).parent / "presets", Path(__file__).parent.parent / "models")


def load_preset(name_or_path: str | Path) -> SPJConfig:
    """A preset by name (`student`) or by path (`models/student.json`)."""
    path = Path(name_or_path)
    if path.suffix != ".json":  # a name, dots and all (tinyllama-1.1b)
        path = next((d / f"{name_or_path}.json" for d in PRESET_DIRS if (d / f"{name_or_path}.json").is_file()), path)
    if not path.is_file():
        names = sorted({p.stem for d in PRESET_DIRS if d.is_dir() for p in d.glob("*.json")})
        raise SPJError(f"{name_or_path}: no such preset (known: {', '.join(names)})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SPJError(f"{path}: not valid JSON ({e})") from None
    values.pop("_comment", None)
    unknown = set(values) - {f.name for f in dataclasses.fields(SPJConfig)}
    if unknown:
        raise SPJError(f"{path}: unknown config fields {sorted(unknown)}")
    return SPJConfig(**values)
