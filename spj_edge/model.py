"""SlimPajama: a Llama-style decoder in one file.

token embedding (tied with the LM head) → N × [RMSNorm → grouped-query attention with RoPE → residual →
RMSNorm → SwiGLU MLP → residual] → RMSNorm → logits.

The module and parameter names are Hugging Face's `LlamaForCausalLM` minus its `model.` prefix, so a checkpoint is
theirs (see checkpoint.py) and the exported ONNX graph gets names like `/layers.3/mlp/down_proj/MatMul`. The KV cache
goes in and out as plain tensors, one (key, value) pair per layer, shaped [batch, kv_heads, past, head_dim]: nothing
the ONNX exporter can't trace.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeScaling, SPJConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


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


def rope_frequencies(cfg: SPJConfig) -> torch.Tensor:
    """The rotary inverse frequencies, [head_dim / 2], computed as transformers does (float32, same operations), so
    that the cos/sin tables are bit for bit theirs; rope scaling changes these and nothing else."""
    arange = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu")  # even where the model is on "meta"
    inv_freq = 1.0 / cfg.rope_theta ** (arange.float() / cfg.head_dim)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    return _llama3_frequencies(inv_freq, scaling)


def _llama3_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule: wavelengths shorter than original context / high_freq_factor are kept, longer than original
    context / low_freq_factor divided by `factor`, and those between interpolated smoothly."""
    context = s.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / s.low_freq_factor, inv_freq / s.factor, inv_freq)
    smooth = (context / wavelength - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = ~(wavelength < context / s.high_freq_factor) & ~(wavelength > context / s.low_freq_factor)
    return torch.where(between, smoothed, scaled)


def packs_weights() -> bool:
    """Whether q, k, v (and gate, up) run as one GEMM on their concatenated weights. In training, where the weights
    change every step and must be concatenated anyway, one GEMM costs noticeably less than three small ones on a CPU,
    and the traced ONNX graph keeps the packed MatMuls the fused graph has. Without autograd (generation, the export's
    checks) each weight is read once either way, and concatenating a real model's weights for every token cost more
    than its GEMMs (SmolLM2-135M: nearly half of a decode step)."""
    return torch.is_grad_enabled() or torch.onnx.is_in_onnx_export()


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
        bias = cfg.attention_bias  # as in LlamaAttention: all four projections, or none
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def qkv_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q, k and v packed into one projection, as the forward pass and the fused graph compute them."""
        weight = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        if self.q_proj.bias is None:
            return weight, None
        return weight, torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias))

    def forward(self, x, cos, sin, mask, past: tuple[torch.Tensor, torch.Tensor] | None):
        batch, seq, _ = x.shape
        if packs_weights():
            qkv = F.linear(x, *self.qkv_weight_and_bias())
            q, k, v = qkv.split((self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                 self.n_kv_heads * self.head_dim), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
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
        if packs_weights():
            gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
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
        # Computed on the CPU even under torch.device("meta"), where a checkpoint is loaded: they are not in its file.
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32, device="cpu")
        angles = torch.outer(positions, rope_frequencies(cfg))
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        if self.embed_tokens.weight.is_meta:
            return  # built to load a checkpoint into (checkpoint.model_of): its weights replace these anyway
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=cfg.initializer_range / math.sqrt(2 * cfg.num_hidden_layers))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

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
