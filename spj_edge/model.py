"""SlimPajama: a Llama-style decoder in one file.

token embedding (tied with the LM head) → N × [RMSNorm → grouped-query attention with RoPE → residual →
RMSNorm → SwiGLU MLP → residual] → RMSNorm → logits.

The module and parameter names are Hugging Face's `LlamaForCausalLM` minus its `model.` prefix, so a checkpoint is
theirs (see checkpoint.py) and the exported ONNX graph gets names like `/layers.3/mlp/down_proj/MatMul`. The KV cache
goes in and out as plain tensors, one (key, value) pair per layer, shaped [batch, kv_heads, past, head_dim]: nothing
the ONNX exporter can't trace.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SPJError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
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


# --- the network ---------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistics in float32 even under autocast, as Llama does: bf16 sums of squares lose too much.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attend(q, k, v, mask):
    """Scaled dot-product attention; k and v may have fewer heads than q (GQA)."""
    if torch.onnx.is_in_onnx_export():
        # The TorchScript exporter has no GQA form of SDPA (it refuses enable_gqa even where q and k have as many
        # heads): give every query head its own copy of its KV head.
        if k.shape[1] != q.shape[1]:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


class Attention(nn.Module):
    def __init__(self, cfg: SPJConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        batch, seq, _ = x.shape
        # One GEMM for q, k and v: on a CPU three small ones cost noticeably more.
        qkv = F.linear(x, torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)))
        q, k, v = qkv.split((self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                             self.n_kv_heads * self.head_dim), dim=-1)
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Rotary and attention in float32 under autocast: more precise, and the CPU's float32 attention kernels are
        # faster than its bf16 ones at these head sizes.
        with torch.autocast(x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if past is not None:
                k = torch.cat((past[0], k), dim=2)
                v = torch.cat((past[1], v), dim=2)
            y = attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(y), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: SPJConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: SPJConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        attn_out, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Transformer(nn.Module):
    def __init__(self, cfg: SPJConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # The rotary table for every position up to the context, looked up by position_ids (a Gather in ONNX).
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)

    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """input_ids [batch, seq]; attention_mask [batch, past + seq] (1 = real token, 0 = padding);
        position_ids [batch, seq]; past_key_values: per layer (key, value) [batch, kv_heads, past, head_dim].
        Returns logits [batch, seq, vocab] and the present cache [batch, kv_heads, past + seq, head_dim].
        """
        batch, seq = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + seq, device=input_ids.device).expand(batch, seq)
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[position_ids].unsqueeze(1)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        mask = None  # plain causal attention: SDPA's is_causal path, the fast one for training
        if attention_mask is not None or past_len:
            mask = self._attention_bias(attention_mask, past_len, seq, torch.float32)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            presents.append(present)
        logits = F.linear(self.norm(x), self.lm_head_weight())
        return logits, presents

    @staticmethod
    def _attention_bias(attention_mask, past_len: int, seq: int, dtype) -> torch.Tensor:
        """Additive bias [batch or 1, 1, seq, past + seq]: 0 where a query may attend, the dtype's minimum elsewhere.

        The minimum rather than -inf keeps a fully masked row (a left-padding query) finite: uniform weights instead of
        NaNs that would leak into the real tokens' values.
        """
        total = past_len + seq
        device = attention_mask.device if attention_mask is not None else None
        query_pos = torch.arange(past_len, total, device=device).unsqueeze(1)
        allowed = torch.arange(total, device=device).unsqueeze(0) <= query_pos
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)


def positions_from_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """position_ids for the last `seq` tokens of a left-padded batch: each row counts its real tokens from 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq:]
