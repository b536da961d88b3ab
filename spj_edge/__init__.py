"""spj-edge: a small Llama-style model from PyTorch training to an onnxruntime-only generate loop on a CPU.

`spj_edge.runtime` needs only onnxruntime, numpy and tokenizers, so nothing here imports torch until the toolchain's
names are used: `from spj_edge import SlimPajama, SPJConfig`.
"""

__version__ = "0.1.0"
__all__ = ["SlimPajama", "SPJConfig"]


def __getattr__(name: str):
    if name == "SlimPajama":
        from .api import SlimPajama

        return SlimPajama
    if name == "SPJConfig":
        from .model import SPJConfig

        return SPJConfig
    raise AttributeError(f"module 'spj_edge' has no attribute {name!r}")
