"""Checkpoints in Hugging Face's layout: config.json + model.safetensors (+ tokenizer.json, report.json).

`transformers.LlamaForCausalLM.from_pretrained(dir)` loads them unchanged, and any local Llama checkpoint of that
layout (sharded or not, any float dtype) loads here. Only safetensors and JSON are read: never a pickle.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .artifact import CONFIG, WEIGHTS, CheckpointArtifact, open_checkpoint
from .errors import SPJError
from .model import Transformer
from .outputs import write_json
from .tokenizer import save_tokenizer_files



def hf_name(name: str) -> str:
    """Our parameter name → Hugging Face's (`layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj.weight`)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def save_checkpoint(directory: Path, model: Transformer, tokenizer: Tokenizer | None, report: dict | None = None):
    """Write into an existing (staged) directory; the caller makes the directory appear atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / CONFIG, model.config.to_hf_dict())
    # Tied embeddings are stored once, as Hugging Face does; .contiguous() because safetensors refuses views.
    tensors = {hf_name(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        save_tokenizer_files(tokenizer, directory)
    if report is not None:
        write_json(directory / "report.json", report)


def read_state_dict(weight_files: list[Path]) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files:
        if not path.is_file():
            raise SPJError(f"{path}: missing weight shard")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except OSError as e:
            raise SPJError(f"{path}: cannot read ({e.strerror or e})") from None
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise SPJError(f"{path}: corrupt or truncated safetensors file ({str(e).splitlines()[0][:120]})") from None
    return tensors


def load_model(directory: str | Path) -> Transformer:
    return model_of(open_checkpoint(directory))


def model_of(checkpoint: CheckpointArtifact) -> Transformer:
    """The network with the checkpoint's weights, each checked against the shape its config implies."""
    directory, config = checkpoint.path, checkpoint.config
    tensors = read_state_dict(checkpoint.weight_files)
    with torch.device("meta"):  # neither memory nor a random init for parameters that the file's tensors replace
        model = Transformer(config)
    expected = {hf_name(k): v for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:  # some exporters store the tied head twice
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise SPJError(f"{directory}: weights do not match config.json ({detail})")
    state = {}
    for name, param in model.state_dict().items():
        tensor = tensors[hf_name(name)]
        if tensor.shape != param.shape:
            raise SPJError(f"{directory}: {hf_name(name)} has shape {list(tensor.shape)}, config.json implies "
                           f"{list(param.shape)}")
        state[name] = tensor.float().contiguous()
    model.load_state_dict(state, assign=True)
    return model.eval()


def load_checkpoint(directory: str | Path) -> tuple[Transformer, Tokenizer]:
    """The model and its tokenizer, checked against each other."""
    checkpoint = open_checkpoint(directory)
    return model_of(checkpoint), checkpoint.tokenizer


def checkpoint_sha256(directory: str | Path) -> str:
    """A hash of the weights and config, recorded by later stages to name their source."""
    checkpoint = open_checkpoint(directory)
    return files_sha256([checkpoint.path / CONFIG, *checkpoint.weight_files])


def files_sha256(paths: list[Path]) -> str:
    """The sha256 of the files' contents one after another, read a megabyte at a time."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()

