"""Reference generation in PyTorch with the KV cache: what the exported and quantized models are checked against."""
from __future__ import annotations

from typing import Collection, Iterator, TextIO

import torch
from tokenizers import Tokenizer

from .errors import SPJError
from .model import Transformer
from .sampling import Sampler, SamplingParams
from .tokenizer import TextTokenizer


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], max_new_tokens: int, sampler: Sampler,
                 eos_id: int | Collection[int] | None) -> Iterator[int]:
    """Yield new token ids until max_new_tokens, the end of the context, or an id of `eos_id` (one id, several, or
    None for none; not yielded)."""
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    model.eval()
    budget = min(max_new_tokens, model.config.max_position_embeddings - len(prompt_ids))
    history = list(prompt_ids)
    logits, past = model(torch.tensor([prompt_ids]))
    for _ in range(budget):
        next_id = sampler(logits[0, -1].float().numpy(), history)
        if next_id in stop:
            return
        yield next_id
        history.append(next_id)
        logits, past = model(torch.tensor([[next_id]]), past_key_values=past)


def generate(model: Transformer, tokenizer: Tokenizer | TextTokenizer, prompt: str, max_new_tokens: int = 64,
             params: SamplingParams = SamplingParams(), ignore_eos: bool = False) -> Iterator[int]:
    """The new ids for a prompt, framed as the tokenizer frames it (<bos> in front for our presets, as in training),
    until any of its EOS ids. Bad input fails here, before any work."""
    if max_new_tokens < 0:
        raise SPJError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    tokenizer = TextTokenizer.of(tokenizer)
    prompt_ids = tokenizer.encode_prompt(prompt, model.config.max_position_embeddings)
    eos = None if ignore_eos else tokenizer.eos_ids
    sampler = Sampler(params, vocab_limit=min(tokenizer.get_vocab_size(), model.config.vocab_size))
    return generate_ids(model, prompt_ids, max_new_tokens, sampler, eos)


def generate_text(checkpoint: str, prompt: str, chosen: dict, seed: int | None, ignore_eos: bool, stream: TextIO
                  ) -> str:
    """The `spj-edge generate` verb: stream the continuation of `prompt` as it is produced, as the runtime does, with
    the model's own sampling defaults (generation_config.json) where `chosen` (max_new_tokens, temperature, top_k,
    top_p, repetition_penalty) names none."""
    from .checkpoint import load_checkpoint
    from .runtime.generator import text_pieces

    model, tokenizer = load_checkpoint(checkpoint)
    settings = {**TextTokenizer.of(tokenizer).generation, **chosen}
    params = SamplingParams(temperature=settings["temperature"], top_k=settings["top_k"], top_p=settings["top_p"],
                            repetition_penalty=settings["repetition_penalty"], seed=seed)
    pieces = []
    for piece in text_pieces(tokenizer, generate(model, tokenizer, prompt, settings["max_new_tokens"], params,
                                                 ignore_eos)):
        stream.write(piece)
        stream.flush()
        pieces.append(piece)
    stream.write("\n")
    return "".join(pieces)
