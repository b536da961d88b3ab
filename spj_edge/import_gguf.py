"""`spj-edge import`: a llama.cpp GGUF of a Llama model → a checkpoint in Hugging Face's layout, which every later
stage (export, quantize, eval, …) and `transformers` read as they read any other.

    config.json, model.safetensors      the weights dequantized (float32, or bfloat16 on request), one tensor at a time
    tokenizer.json                      rebuilt from the GGUF's vocabulary, merges and token types
    tokenizer_config.json               special tokens, add_bos_token and the chat template, as transformers writes them
    generation_config.json              bos, pad and every end-of-generation id, as llama.cpp counts them
    report.json                         the source file, its sha256, the tensor types seen, the time taken

Two things differ between llama.cpp's files and Hugging Face's. Names: `blk.3.ffn_down.weight` is
`model.layers.3.mlp.down_proj.weight`. And the rows of q_proj and k_proj: llama.cpp's converter permutes each head's
rows from Hugging Face's rotate-half rotary layout (first half of the head, then second) to GGML's interleaved one
(pairs of neighbours); the import undoes that permutation, as transformers' own GGUF loader does.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .artifact import CONFIG, WEIGHTS, open_checkpoint
from .checkpoint import files_sha256, hf_name, model_of
from .config import RopeScaling, SPJConfig
from .errors import SPJError
from .model import Transformer
from .options import IMPORT_DTYPES
from .outputs import check_output, staged_dir, write_json
from .tables import print_summary
from .tokenizer import save_tokenizer

DTYPES = dict(zip(IMPORT_DTYPES, (torch.float32, torch.bfloat16)))
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}
# The tensor types gguf.quants dequantizes with a plain numpy kernel; the i-quants' lattice kernels are slow and rare
# in the small models this is for.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp's token types (llama_token_type)
CONTROL, USER_DEFINED = 3, 4
# What llama.cpp also stops generation on, besides the eos and eot ids the file names: a control token with one of
# these texts (llama-vocab.cpp), e.g. SmolLM's <|endoftext|> next to its eos <|im_end|>.
END_OF_GENERATION_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>",
                           "<|end_of_text|>", "<end_of_utterance>", "<EOT>")
# How each vocabulary splits text before its merges apply, by tokenizer.ggml.pre. The byte-level step's own regex is
# GPT-2's; Llama 3 replaces it with its own.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    # SmolLM: every digit its own piece, then GPT-2's split (its tokenizer.json on the Hub)
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": lambda: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


# --- reading the file ------------------------------------------------------------------------------------------------
def open_gguf(path: Path):
    """The file parsed by gguf's reader (memory-mapped: tensors are read when dequantized), refused in one line if it
    is not a GGUF or is damaged."""
    from gguf import GGUFReader

    if not path.is_file():
        raise SPJError(f"{path}: {'is a directory, expected a .gguf file' if path.is_dir() else 'no such file'}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SPJError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise SPJError(f"{path}: damaged or truncated GGUF file ({reason})") from None


class Metadata:
    """The GGUF's key-value metadata, read with the file named in every refusal."""

    def __init__(self, reader, path: Path):
        self.fields, self.path = reader.fields, path
        self._values = {}  # decoding the vocabulary's 50 K strings takes a while: once per key

    def get(self, key: str, default=None):
        if key not in self.fields:
            return default
        if key not in self._values:
            self._values[key] = self.fields[key].contents()
        return self._values[key]

    def require(self, key: str):
        if key not in self.fields:
            raise SPJError(f"{self.path}: metadata lacks {key}")
        return self.get(key)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default) if default is not None else self.require(key)
        if not isinstance(value, int):  # a per-layer array (models whose layers differ) is not a Llama
            raise SPJError(f"{self.path}: {key} is {value!r}, expected one integer")
        return value


def read_config(meta: Metadata, tensor_names: set[str]) -> SPJConfig:
    """The model's shape from the `llama.*` metadata; anything it cannot represent is named in one line."""
    arch = meta.require("general.architecture")
    if arch != "llama":
        raise SPJError(f"{meta.path}: architecture {arch!r} is not supported (supported: 'llama')")
    hidden, heads = meta.integer("llama.embedding_length"), meta.integer("llama.attention.head_count")
    head_dim = meta.integer("llama.attention.key_length", hidden // max(1, heads))
    if meta.integer("llama.attention.value_length", head_dim) != head_dim:
        raise SPJError(f"{meta.path}: llama.attention.value_length differs from key_length, which is not supported")
    if meta.integer("llama.rope.dimension_count", head_dim) != head_dim:
        raise SPJError(f"{meta.path}: llama.rope.dimension_count is not the head size: partial rotary embeddings are "
                       "not supported")
    if "rope_freqs.weight" in tensor_names:
        raise SPJError(f"{meta.path}: tensor rope_freqs.weight (Llama 3.1's rope scaling, stored as frequency "
                       "factors) is not supported")
    scaling_type = meta.get("llama.rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise SPJError(f"{meta.path}: llama.rope.scaling.type {scaling_type!r} is not supported (supported: none, "
                       "linear)")
    scaling = None
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(meta.require("llama.rope.scaling.factor")))
    tokens = meta.require("tokenizer.ggml.tokens")
    eos = meta.integer("tokenizer.ggml.eos_token_id", 2)
    values = dict(
        vocab_size=meta.integer("llama.vocab_size", len(tokens)),
        hidden_size=hidden,
        intermediate_size=meta.integer("llama.feed_forward_length"),
        num_hidden_layers=meta.integer("llama.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta.integer("llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        max_position_embeddings=meta.integer("llama.context_length"),
        rms_norm_eps=float(meta.require("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=meta.integer("tokenizer.ggml.bos_token_id", 1),
        eos_token_id=eos,
        pad_token_id=meta.integer("tokenizer.ggml.padding_token_id", eos),
    )
    return SPJConfig(**values)


def hf_tensor_name(gguf_name: str, path: Path) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_TENSORS:
        raise SPJError(f"{path}: tensor {gguf_name} is not part of a Llama model (mixture of experts, a vision tower, "
                       "…): not supported")
    return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}.{match[3]}"


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation (convert_hf_to_gguf.py's `permute`): within each head, GGML keeps the rotary
    pairs (i, i + d/2) as neighbouring rows 2i, 2i + 1; Hugging Face keeps the two halves apart. Rows are the output
    dimension, so this applies to a bias as to a weight."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantized(tensor, config: SPJConfig) -> np.ndarray:
    """One tensor as float32 in Hugging Face's layout: [out, in] for a matrix, as GGUF stores its rows."""
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    if not array.flags.writeable:  # F32 comes back as a view of the memory-mapped file
        array = array.copy()
    if ".attn_q." in tensor.name:
        array = unpermute_rotary_rows(array, config.num_attention_heads)
    elif ".attn_k." in tensor.name:
        array = unpermute_rotary_rows(array, config.num_key_value_heads)
    return array


# --- the tokenizer ---------------------------------------------------------------------------------------------------
def build_tokenizer(meta: Metadata) -> tuple[Tokenizer, dict]:
    """tokenizer.json's Tokenizer and tokenizer_config.json's content, from the GGUF's tokenizer metadata."""
    kind, pre = meta.require("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise SPJError(f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', byte-level "
                       "BPE)")
    if pre not in PRE_TOKENIZERS:
        raise SPJError(f"{meta.path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                       f"{', '.join(PRE_TOKENIZERS)})")
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(merge.split(" ", 1)) for merge in meta.require("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) are special: matched whole, skipped when decoding with skip_special_tokens;
    # user-defined ones (<think>) are matched whole but are text.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, types) if kind == USER_DEFINED])

    def special(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None else None

    bos, eos = special("bos_token_id"), special("eos_token_id")
    add_bos, add_eos = meta.get("tokenizer.ggml.add_bos_token", False), meta.get("tokenizer.ggml.add_eos_token", False)
    single = [*([bos] if add_bos else []), "$A", *([eos] if add_eos else [])]
    pair = [*single, *([bos] if add_bos else []), "$B:1", *([eos] if add_eos else [])]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair),
        special_tokens=[(t, tokens.index(t)) for t in dict.fromkeys(s for s in (bos, eos) if s in single + pair)])
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "bos_token": bos, "eos_token": eos, "pad_token": special("padding_token_id"),
        "unk_token": special("unknown_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.integer("llama.context_length"),
    }
    template = meta.get("tokenizer.chat_template")
    if template is not None:
        tokenizer_config["chat_template"] = template
    return tokenizer, tokenizer_config


def end_of_generation_ids(meta: Metadata) -> list[int]:
    """What llama.cpp stops on: the file's eos, eot and eom ids, then every control token whose text marks an end."""
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    named = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    marked = [i for i, (token, kind) in enumerate(zip(tokens, types))
              if kind == CONTROL and token in END_OF_GENERATION_TEXTS]
    return list(dict.fromkeys(i for i in [*named, *marked] if i is not None))


# --- the stage -------------------------------------------------------------------------------------------------------
def import_gguf(gguf: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> dict:
    """The `spj-edge import` stage: `gguf` → the checkpoint directory `out`; returns its report."""
    gguf, out = Path(gguf), Path(out)
    if dtype not in DTYPES:
        raise SPJError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    check_output(out, [gguf], overwrite=overwrite)
    started = time.perf_counter()
    reader = open_gguf(gguf)
    meta = Metadata(reader, gguf)
    config = read_config(meta, {t.name for t in reader.tensors})
    tokenizer, tokenizer_config = build_tokenizer(meta)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    unsupported = sorted(set(types) - set(SUPPORTED_TYPES))
    if unsupported:
        raise SPJError(f"{gguf}: tensor type {unsupported[0]} is not supported (supported: "
                       f"{', '.join(SUPPORTED_TYPES)})")
    with torch.device("meta"):  # the shapes the config implies, without allocating the model
        expected = {hf_name(k): tuple(v.shape) for k, v in Transformer(config).state_dict().items()}

    names = {}
    for tensor in reader.tensors:  # every name and shape checked before any work
        name = names[tensor.name] = hf_tensor_name(tensor.name, gguf)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if name not in expected:
            raise SPJError(f"{gguf}: tensor {tensor.name} ({name}) does not belong to the model its metadata "
                           "describes")
        if shape != expected[name]:
            raise SPJError(f"{gguf}: tensor {tensor.name} has shape {list(shape)}, the metadata implies "
                           f"{list(expected[name])}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise SPJError(f"{gguf}: tensor {missing[0]} is missing")

    report = {
        "stage": "import", "source": str(gguf), "source_sha256": files_sha256([gguf]), "dtype": dtype,
        "tensor_types": dict(types.most_common()), "tensors": len(names),
        "parameters": config.num_parameters(), "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"), "pre": meta.get("tokenizer.ggml.pre", "default"),
            "tokens": tokenizer.get_vocab_size(), "merges": len(meta.require("tokenizer.ggml.merges"))},
        "end_of_generation_ids": end_of_generation_ids(meta),
    }
    with staged_dir(out) as tmp:
        write_json(tmp / CONFIG, {**config.to_hf_dict(), "dtype": dtype})
        write_weights(tmp / WEIGHTS, reader.tensors, names, expected, config, DTYPES[dtype])
        save_tokenizer(tokenizer, tmp / "tokenizer.json")
        write_json(tmp / "tokenizer_config.json", tokenizer_config)
        write_json(tmp / "generation_config.json", {
            "bos_token_id": config.bos_token_id, "eos_token_id": report["end_of_generation_ids"],
            "pad_token_id": config.pad_token_id})
        report["checks"] = check_imported(tmp)
        report["import_s"] = round(time.perf_counter() - started, 2)
        write_json(tmp / "report.json", report)
    print_summary(f"import: {gguf} → {out}", [
        ("model", f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                  f"{config.num_attention_heads}/{config.num_key_value_heads} heads, vocab {config.vocab_size}"),
        ("parameters", f"{config.num_parameters() / 1e6:.1f} M"),
        ("tensor types", ", ".join(f"{k} {v}" for k, v in report["tensor_types"].items())),
        ("weights", f"{dtype}, {(out / WEIGHTS).stat().st_size / 1e6:.1f} MB"),
        ("tokenizer", f"{report['tokenizer']['tokens']} tokens, pre-tokenizer {report['tokenizer']['pre']}"),
        ("end of generation", ", ".join(map(str, report["end_of_generation_ids"]))),
        ("time", f"{report['import_s']:.1f} s")])
    return report


def write_weights(path: Path, tensors, names: dict[str, str], shapes: dict[str, tuple], config: SPJConfig,
                  dtype: torch.dtype) -> None:
    """model.safetensors, written as each tensor is dequantized: the header first (names, shapes and offsets are
    known from the metadata), then the tensors' bytes in file order, so that no more than one tensor is in memory."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for tensor in tensors:
        size = int(np.prod(shapes[names[tensor.name]])) * itemsize
        header[names[tensor.name]] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[names[tensor.name]]),
                                      "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tqdm(tensors, desc="import", unit="tensor", dynamic_ncols=True):
            weight = torch.from_numpy(dequantized(tensor, config)).to(dtype)  # float32 to float32: no copy
            if tuple(weight.shape) != shapes[names[tensor.name]]:
                raise SPJError(f"{tensor.name}: its data has shape {list(weight.shape)}, its header says "
                               f"{list(shapes[names[tensor.name]])}")
            f.write(weight.contiguous().view(torch.uint8).numpy())


def check_imported(directory: Path) -> dict:
    """The checkpoint as every later stage reads it: our loader accepts its weights and tokenizer, a forward pass is
    finite, and the tokenizer round-trips real text in five languages."""
    from .export import LONG_TEXT, verification_prompt

    checkpoint = open_checkpoint(directory)
    model, tokenizer = model_of(checkpoint), checkpoint.tokenizer
    ids = verification_prompt(tokenizer, model.config)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    if not torch.isfinite(logits).all():
        raise SPJError(f"import check failed: the imported model's logits are not finite on {len(ids)} tokens")
    if tokenizer.decode(tokenizer.encode(LONG_TEXT, add_special_tokens=False).ids) != LONG_TEXT:
        raise SPJError("import check failed: the rebuilt tokenizer does not round-trip text")
    return {"forward_tokens": len(ids), "max_abs_logit": round(float(logits.abs().max()), 3),
            "tokenizer_round_trip": True}
