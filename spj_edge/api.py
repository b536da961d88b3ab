"""The Python API: `SlimPajama("student").train([...])`, `SlimPajama.from_pretrained(dir)`, `model("To be")`."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import SPJError
from .generate import generate
from .config import SPJConfig, load_preset
from .model import Transformer
from .outputs import staged_dir
from .sampling import SamplingParams
from .train import TrainOptions, train


class SlimPajama:
    """A model with its tokenizer. Not an nn.Module: `train` means training here (the module is `.module`)."""

    def __init__(self, config: str | SPJConfig = "student", tokenizer: Tokenizer | None = None):
        self.config = load_preset(config) if isinstance(config, str) else config
        self.module = Transformer(self.config)
        self.tokenizer = tokenizer
        self.report: dict | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path) -> SlimPajama:
        module, tokenizer = load_checkpoint(path)
        model = cls(module.config, tokenizer)
        model.module = module
        return model

    def train(self, data: list[str | Path] | str | Path, steps: int = 1000, out: str | Path | None = None,
              **options) -> SlimPajama:
        """Train from scratch on text files or directories; a tokenizer is trained first if the model has none.
        `options` are TrainOptions fields (batch_size, lr, precision, …); `out` also saves a checkpoint there."""
        data = [data] if isinstance(data, (str, Path)) else list(data)
        self.module, self.tokenizer, self.report = train(
            self.config, data, out, TrainOptions(steps=steps, **options), tokenizer=self.tokenizer,
            overwrite=True)
        self.config = self.module.config
        return self

    def save(self, path: str | Path) -> Path:
        self._require_tokenizer()
        with staged_dir(path) as tmp:
            save_checkpoint(tmp, self.module, self.tokenizer, self.report)
        return Path(path)

    def __call__(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False) -> str:
        """The generated continuation of `prompt` (greedy by default)."""
        self._require_tokenizer()
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = list(generate(self.module, self.tokenizer, prompt, max_new_tokens, params, ignore_eos))
        return self.tokenizer.decode(ids)

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise SPJError("this model has no tokenizer yet: train it or load one with SlimPajama.from_pretrained")

    def __repr__(self) -> str:
        c = self.config
        return (f"SlimPajama({c.num_parameters():,} parameters: {c.num_hidden_layers} layers, hidden {c.hidden_size}, "
                f"{c.num_attention_heads}/{c.num_key_value_heads} heads, vocab {c.vocab_size})")
