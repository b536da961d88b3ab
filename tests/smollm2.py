"""A real tokenizer for the tests: SmolLM2-135M-Instruct's, as transformers reads it from the GGUF in
../shared/models (the independent reference: no code of spj-edge reads the GGUF here), saved with save_pretrained
(tokenizer.json, tokenizer_config.json, chat_template.jinja) and a generation_config.json like the model's.

And models of its vocabulary, saved as our checkpoints with those files:
- `random_checkpoint`: SmolLM2's shape (vocabulary 49152, hidden 576, 9 heads / 3 KV heads, FFN 1536, tied head)
  with 2 layers and random weights;
- `scripted_checkpoint`: a tiny model that continues by a table, so a test knows what it says: every layer's output
  projections are zero, so the last hidden state is the current token's embedding, a one-hot of the token's slot, and
  the untied head maps each slot to its successor by a logit of 80 against 0.
"""
from __future__ import annotations

import json
from pathlib import Path

from conftest import REPO

GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BOS, IM_END, END_OF_TEXT = 1, 2, 0  # <|im_start|>, <|im_end|>, <|endoftext|>
# Like the model's own: both <|im_end|> and <|endoftext|> end generation; it samples at 0.2 with top-p 0.9.
GENERATION_CONFIG = {"bos_token_id": BOS, "eos_token_id": [IM_END, END_OF_TEXT], "pad_token_id": IM_END,
                     "do_sample": True, "temperature": 0.2, "top_p": 0.9}
SHAPE = dict(vocab_size=49152, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
             num_hidden_layers=2, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=2048,
             bos_token_id=BOS, eos_token_id=IM_END, pad_token_id=IM_END)
REPLY = "The capital of France is Paris."
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"}]


def tokenizer_files(directory: Path) -> Path:
    """SmolLM2's tokenizer files, written by transformers into `directory`."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return directory


def reference(directory: Path):
    """transformers' tokenizer from the files in `directory`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def random_checkpoint(directory: Path, files: Path) -> Path:
    import torch

    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.config import SPJConfig
    from spj_edge.model import Transformer
    from spj_edge.tokenizer import load_tokenizer

    torch.manual_seed(0)
    save_checkpoint(directory, Transformer(SPJConfig(**SHAPE)), load_tokenizer(files / "tokenizer.json"))
    return directory


def scripted_checkpoint(directory: Path, files: Path, script: dict[int, int], otherwise: int) -> Path:
    """A model that follows token `t` with `script[t]`, and any other token with `otherwise`."""
    import torch

    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.config import SPJConfig
    from spj_edge.model import Transformer
    from spj_edge.tokenizer import load_tokenizer

    hidden = 64
    assert len(script) < hidden, "a slot per scripted token, and one for the rest"
    rest = hidden - 1
    config = SPJConfig(**{**SHAPE, "hidden_size": hidden, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "intermediate_size": 64, "num_hidden_layers": 1, "tie_word_embeddings": False,
                          "max_position_embeddings": 512})
    model = Transformer(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, rest] = 1
        model.lm_head.weight.zero_()
        model.lm_head.weight[otherwise, rest] = 10
        for slot, (token, successor) in enumerate(script.items()):
            model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(slot), hidden).float()
            model.lm_head.weight[successor, slot] = 10
    save_checkpoint(directory, model, load_tokenizer(files / "tokenizer.json"))
    return directory


def chain(ids: list[int]) -> dict[int, int]:
    """The script that says `ids[1:]` after `ids[0]`: each id of `ids` but the last must be different."""
    assert len(set(ids[:-1])) == len(ids) - 1, ids
    return dict(zip(ids, ids[1:]))
