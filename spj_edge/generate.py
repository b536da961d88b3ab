"""Reference generation in PyTorch with the KV cache: what the exported and quantized models are checked against."""
from __future__ import annotations

from typing import Iterator, TextIO

import torch
from tokenizers import Tokenizer

from .errors import SPJError
from .model import Transformer
from .sampling import Sampler, SamplingParams
from .tokenizer import encode_prompt, special_token_ids


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 eos_id: int | None) -> Iterator[int]:
    """Yield new token ids until max_new_tokens, the end of the context, or `eos_id` (not yielded)."""
    model.eval()
    budget = min(max_new_tokens, model.config.max_position_embeddings - len(prompt_ids))
    history = list(prompt_ids)
    logits, past = model(torch.tensor([prompt_ids]))
    for _ in range(budget):
        next_id = sampler(logits[0, -1].float().numpy(), history)
        if next_id == eos_id:
            return
        yield next_id
        history.append(next_id)
        logits, past = model(torch.tensor([[next_id]]), past_key_values=past)


def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int = 64,
             params: SamplingParams = SamplingParams(), ignore_eos: bool = False) -> Iterator[int]:
    """The new ids for a prompt (prefixed with <bos>, as in training). Bad input fails here, before any work."""
    if max_new_tokens < 0:
        raise SPJError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.max_position_embeddings, model.config.bos_token_id)
    eos = None if ignore_eos else special_token_ids(tokenizer)["eos_token_id"]
    sampler = Sampler(params, vocab_limit=min(tokenizer.get_vocab_size(), model.config.vocab_size))
    return generate_ids(model, prompt_ids, max_new_tokens, sampler, eos)


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int, params: SamplingParams, ignore_eos: bool,
                  stream: TextIO) -> str:
    """The `spj-edge generate` verb: stream the continuation of `prompt` as it is produced, as the runtime does."""
    from .checkpoint import load_checkpoint
    from .runtime.generator import text_pieces

    model, tokenizer = load_checkpoint(checkpoint)
    pieces = []
    for piece in text_pieces(tokenizer, generate(model, tokenizer, prompt, max_new_tokens, params, ignore_eos)):
        stream.write(piece)
        stream.flush()
        pieces.append(piece)
    stream.write("\n")
    return "".join(pieces)
