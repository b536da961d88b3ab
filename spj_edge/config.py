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
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self):
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
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attention = h * self.num_attention_heads * self.head_dim * 2 + h * kv * 2
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * layer + h + head

    # --- Hugging Face's config.json -----------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **fields,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            # transformers 5 reads rope_parameters, older releases and other tools read rope_theta
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
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
            "attention_bias": (d.get("attention_bias", False), False),
            "mlp_bias": (d.get("mlp_bias", False), False),
        }
        for key, (value, wanted) in unsupported.items():
            if value != wanted:
                raise SPJError(f"{source}: {key}={value!r} is not supported (only {wanted!r})")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise SPJError(f"{source}: rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(key), list):  # some checkpoints list several ids; the first is the canonical one
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
    if not path.suffix:
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
