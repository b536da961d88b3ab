"""Structured width pruning: fewer FFN channels and attention heads, physically removed, so the checkpoint, the ONNX
graph and every matrix product per token shrink. The Minitron recipe: rank by activations on calibration text (or by
weight L1 norms), cut every layer to the same width, then recover with logit distillation (`spj-edge distill
--student PRUNED`).

An FFN channel j is row j of gate_proj and up_proj and column j of down_proj; an attention head is its head_dim rows of
q_proj and columns of o_proj. The result is an ordinary checkpoint with a smaller config.

`method="magnitude"` is the unstructured alternative, for comparison: it zeroes the smallest weights and shrinks
nothing, so on ONNX Runtime's dense CPU kernels it is exactly as large and as slow as before.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import checkpoint_sha256, load_checkpoint, save_checkpoint
from . import data
from .errors import SPJError
from .model import Transformer
from .options import PruneOptions
from .outputs import check_output, staged_dir, write_json
from .tables import print_summary
from .tokenizer import token_byte_lengths
from .train import heldout_metrics

CALIB_WINDOWS = 128  # windows of calibration text for the activation statistics: the ranking is stable well before
HELDOUT_WINDOWS = 64  # windows of its held-out end (data.calibration_split), to measure bits per byte before and after
BATCH = 8


def kept_size(size: int, ratio: float, multiple: int) -> int:
    """size × (1 − ratio) rounded up to a multiple, and never above size: ratio 0 keeps everything, and no ratio
    removes more than it asks for. (The round() absorbs float error: 704 × 0.5 / 16 must be 22, not 22.000001.)"""
    return min(size, math.ceil(round(size * (1 - ratio) / multiple, 6)) * multiple)


# --- importance -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def activation_importance(model: Transformer, windows: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, averaged over every token of the calibration windows: the mean |activation| of each FFN channel
    (silu(gate) · up, the input of down_proj), and of each attention head's output as it enters the residual stream
    (its slice of o_proj applied to its attention output).

    Heads are measured after o_proj, not before: the query heads of a KV group mix the same value vectors, so the size
    of their attention outputs says little, and it is o_proj's columns that decide what each head adds (zero them and
    the head does nothing, however large its attention output)."""
    cfg = model.config
    ffn = [torch.zeros(cfg.intermediate_size) for _ in model.layers]
    heads = [torch.zeros(cfg.num_attention_heads) for _ in model.layers]

    def ffn_hook(total: torch.Tensor):
        def hook(module, args):
            total.add_(args[0].float().abs().sum((0, 1)).cpu())
        return hook

    def head_hook(total: torch.Tensor):
        def hook(module, args):
            per_head = args[0].float().unflatten(-1, (cfg.num_attention_heads, cfg.head_dim))
            weight = module.weight.float().view(-1, cfg.num_attention_heads, cfg.head_dim)
            total.add_(torch.einsum("bshd,ohd->bsho", per_head, weight).abs().mean(-1).sum((0, 1)).cpu())
        return hook

    handles = []
    for layer, ffn_total, head_total in zip(model.layers, ffn, heads):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(ffn_total)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook(head_total)))
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(windows), BATCH), desc="calibrate", unit="batch", dynamic_ncols=True):
            model(torch.from_numpy(windows[start:start + BATCH, :-1]).to(device))
    finally:
        for handle in handles:
            handle.remove()
    tokens = windows[:, :-1].size
    return [t / tokens for t in ffn], [t / tokens for t in heads]


@torch.no_grad()
def l1_importance(model: Transformer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer: the L1 norm of the weights each FFN channel and each attention head owns (in and out)."""
    cfg = model.config
    ffn, heads = [], []
    for layer in model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        ffn.append(mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                   + mlp.down_proj.weight.abs().sum(0))
        q = attn.q_proj.weight.view(cfg.num_attention_heads, cfg.head_dim, -1)
        o = attn.o_proj.weight.view(-1, cfg.num_attention_heads, cfg.head_dim)
        heads.append(q.abs().sum((1, 2)) + o.abs().sum((0, 2)))
    return ffn, heads


# --- structured pruning -----------------------------------------------------------------------------------------------
def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` most important indices, in their original order (so pruning nothing changes nothing)."""
    return scores.topk(keep).indices.sort().values


def top_heads(scores: torch.Tensor, n_kv_heads: int, keep_per_group: int) -> torch.Tensor:
    """The `keep_per_group` most important query heads of every KV group, group by group, so that query head j of the
    pruned model still reads KV head j // keep_per_group.

    Query heads go, KV heads stay. Every KV head serves its whole group, and removing one takes away the context of
    all its query heads at once; removing query heads evenly per group keeps n_heads % n_kv_heads == 0, the KV cache and
    its ONNX layout, and is what Minitron did to Nemotron-15B (48 query heads / 8 KV heads → 24 / 8)."""
    group = scores.numel() // n_kv_heads
    kept = scores.view(n_kv_heads, group).topk(keep_per_group, dim=1).indices.sort(dim=1).values
    return (kept + torch.arange(n_kv_heads)[:, None] * group).flatten()


def prune_model(model: Transformer, options: PruneOptions,
                calib_windows: np.ndarray | None) -> tuple[Transformer, dict]:
    """A new model with `ffn_ratio` of every layer's FFN channels and `head_ratio` of its query heads removed, the
    least important first. Widths are rounded up to multiples of `multiple` (FFN) and to whole heads per KV group."""
    ffn_ratio, head_ratio, importance = options.ffn_ratio, options.head_ratio, options.importance
    cfg = model.config
    if importance == "activation":
        if calib_windows is None:
            raise SPJError("--importance activation needs calibration text (--calib PATH)")
        ffn_scores, head_scores = activation_importance(model, calib_windows)
    else:
        ffn_scores, head_scores = l1_importance(model)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    ffn_keep = kept_size(cfg.intermediate_size, ffn_ratio, options.multiple)
    group_keep = kept_size(group, head_ratio, 1)
    pruned_cfg = cfg.replace(intermediate_size=ffn_keep, num_attention_heads=group_keep * cfg.num_key_value_heads)

    state = model.state_dict()  # a new dict: replacing its entries leaves the model alone
    head_offsets = torch.arange(cfg.head_dim)
    details = {"importance": importance, "intermediate_size": [cfg.intermediate_size, ffn_keep],
               "num_attention_heads": [cfg.num_attention_heads, pruned_cfg.num_attention_heads], "layers": []}
    for i, (ffn_score, head_score) in enumerate(zip(ffn_scores, head_scores)):
        channels = top_channels(ffn_score, ffn_keep)
        heads = top_heads(head_score, cfg.num_key_value_heads, group_keep)
        rows = (heads[:, None] * cfg.head_dim + head_offsets).flatten()
        mlp, attn = f"layers.{i}.mlp.", f"layers.{i}.self_attn."
        state[mlp + "gate_proj.weight"] = state[mlp + "gate_proj.weight"][channels]
        state[mlp + "up_proj.weight"] = state[mlp + "up_proj.weight"][channels]
        state[mlp + "down_proj.weight"] = state[mlp + "down_proj.weight"][:, channels]
        state[attn + "q_proj.weight"] = state[attn + "q_proj.weight"][rows]
        state[attn + "o_proj.weight"] = state[attn + "o_proj.weight"][:, rows]
        if cfg.attention_bias:  # q's bias goes with its rows; o's is per output channel and stays whole
            state[attn + "q_proj.bias"] = state[attn + "q_proj.bias"][rows]
        removed_heads = sorted(set(range(cfg.num_attention_heads)) - set(heads.tolist()))
        details["layers"].append({
            "ffn_channels_removed": cfg.intermediate_size - ffn_keep,
            # how much of the layer's total importance went with them: near 0 is a cheap cut
            "ffn_importance_removed": 1 - float(ffn_score[channels].sum() / ffn_score.sum()),
            "heads_removed": removed_heads,
            "head_importance_removed": 1 - float(head_score[heads].sum() / head_score.sum()),
        })
    pruned = Transformer(pruned_cfg)
    pruned.load_state_dict(state)
    return pruned.eval(), details


# --- unstructured, for comparison -------------------------------------------------------------------------------------
@torch.no_grad()
def magnitude_prune(model: Transformer, ffn_ratio: float, head_ratio: float) -> tuple[Transformer, dict]:
    """A copy with the smallest-|w| `ffn_ratio` of every FFN matrix and `head_ratio` of every attention projection set
    to zero. Same shapes, same file size, same speed: it only shows what unstructured sparsity buys on a CPU."""
    pruned = copy.deepcopy(model)
    zeroed = 0
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("layers."):
            weight = module.weight.view(-1)
            count = round(weight.numel() * (ffn_ratio if ".mlp." in name else head_ratio))
            weight[weight.abs().argsort()[:count]] = 0
            zeroed += count
    return pruned.eval(), {"weights_zeroed": zeroed}


# --- the stage --------------------------------------------------------------------------------------------------------
def calibration_split(calib: list, tokenizer, context: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the calibration text for the statistics, and windows of its held-out end to measure on."""
    calib_stream, held_out = data.calibration_split(calib, tokenizer)
    calib_windows, heldout_windows = data.windows(calib_stream, context), data.windows(held_out, context)
    if not (len(calib_windows) and len(heldout_windows)):
        raise SPJError(f"{', '.join(map(str, calib))}: too little text ({len(calib_stream) + len(held_out)} tokens) "
                       f"for windows of {context + 1} tokens in both its calibration part and its held-out end; give "
                       "more text")
    return calib_windows[:CALIB_WINDOWS], heldout_windows[:HELDOUT_WINDOWS]


def weights_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def prune(model_dir: str | Path, out: str | Path, *, calib: list | None = None,
          options: PruneOptions = PruneOptions(), overwrite: bool = False) -> dict:
    """Prune the checkpoint `model_dir` into a new checkpoint `out`; returns the report written there."""
    ffn_ratio, head_ratio, method = options.ffn_ratio, options.head_ratio, options.method
    if method == "structured" and options.importance == "activation" and not calib:
        raise SPJError("--importance activation needs calibration text: pass --calib PATH (or --importance l1)")
    model_dir, out = Path(model_dir), Path(out)
    check_output(out, [model_dir, *(calib or [])], overwrite=overwrite)
    model, tokenizer = load_checkpoint(model_dir)
    cfg = model.config
    calib_windows, heldout = calibration_split(calib, tokenizer, cfg.max_position_embeddings) if calib else (None, None)

    if method == "structured":
        pruned, details = prune_model(model, options, calib_windows)
    else:
        pruned, details = magnitude_prune(model, ffn_ratio, head_ratio)
        details["note"] = ("unstructured pruning shrinks nothing and speeds nothing on ONNX Runtime's CPU kernels: "
                           "they are dense and do not skip zeros, and every tensor keeps its shape, so the checkpoint "
                           "and the ONNX file keep their size; use --method structured for a smaller, faster model")
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer, cfg.vocab_size))
    quality = {name: heldout_metrics(m, heldout, byte_lengths, BATCH) if heldout is not None else None
               for name, m in (("before", model), ("after", pruned))}

    report = {
        "stage": "prune", "source": str(model_dir), "source_sha256": checkpoint_sha256(model_dir), "method": method,
        "ffn_ratio": ffn_ratio, "head_ratio": head_ratio, "multiple": options.multiple,
        "calib": [str(p) for p in calib or []],
        "calib_windows": 0 if calib_windows is None else len(calib_windows),
        "config": pruned.config.to_hf_dict(),
        "parameters": {"before": sum(p.numel() for p in model.parameters()),
                       "after": sum(p.numel() for p in pruned.parameters()),
                       "nonzero_after": sum(int(p.count_nonzero()) for p in pruned.parameters())},
        "file_bytes": {"before": weights_bytes(model_dir)},
        "heldout": quality, "removed": details,
    }
    with staged_dir(out) as tmp:
        save_checkpoint(tmp, pruned, tokenizer)
        report["file_bytes"]["after"] = weights_bytes(tmp)
        write_json(tmp / "report.json", report)

    params, size = report["parameters"], report["file_bytes"]
    rows = [("method", method), ("FFN width", f"{cfg.intermediate_size} → {pruned.config.intermediate_size}"),
            ("query heads", f"{cfg.num_attention_heads} → {pruned.config.num_attention_heads}"),
            ("parameters", f"{params['before']:,} → {params['after']:,} ({params['nonzero_after']:,} nonzero)"),
            ("file", f"{size['before'] / 1e6:.2f} MB → {size['after'] / 1e6:.2f} MB")]
    if heldout is not None:
        rows.append(("bits per byte", f"{quality['before']['bits_per_byte']:.4f} → "
                                      f"{quality['after']['bits_per_byte']:.4f}"))
    if method == "magnitude":
        rows.append(("note", "shrinks nothing, speeds nothing"))
    print_summary(f"prune: {model_dir} → {out}", rows)
    return report
