"""spj-edge: a small Llama-style model from PyTorch training to an onnxruntime-only generate loop on a CPU.

`spj_edge.runtime` needs only onnxruntime, numpy and tokenizers, so nothing here imports torch until the toolchain's
names are used: `from spj_edge import SlimPajama, SPJConfig`.
"""

import os

# onnxruntime (1.32, Linux and macOS) writes a telemetry device id and an event database under ~/.cache as it is
# imported, and uploads from there: a write outside the paths the user gave. Both names of its opt-out (1.32 reads the
# first, later releases the second) are set before anything here imports it; a user's own setting wins.
for _name in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):
    os.environ.setdefault(_name, "1")
del _name

__version__ = "0.1.0"
__all__ = ["SlimPajama", "SPJConfig"]


def __getattr__(name: str):
    if name == "SlimPajama":
        from .api import SlimPajama

        return SlimPajama
    if name == "SPJConfig":
        from .config import SPJConfig

        return SPJConfig
    raise AttributeError(f"module 'spj_edge' has no attribute {name!r}")
