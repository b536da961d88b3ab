"""A Hugging Face checkpoint → llama.cpp GGUF files: F16 and F32 with the convert script of the llama.cpp that
llama-cpp-python 0.3.36 vendors, then Q8_0 and Q4_0 with llama.cpp's own quantizer (llama_model_quantize; the
package does not build the llama-quantize binary). Runs in benchmarks/peers/.venv-llama (setup.sh llama).

    .venv-llama/bin/python llama_convert.py HF_DIR OUT_DIR [--pre-tokenizer gpt-2]

--pre-tokenizer: the convert script recognises a BPE tokenizer only by a hash of how it splits a test string, and
refuses any other. Our presets' tokenizer splits as GPT-2 does (byte-level, GPT-2's pattern), so it is named so here,
used only when the hash is unknown; a tokenizer the script knows keeps its own name.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_CPP = HERE / ".cache" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
QUANT_TYPES = ("q8_0", "q4_0")
FLOAT_TYPES = ("f16", "f32")


def import_converter():
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"llama_convert.py: {LLAMA_CPP} missing (run benchmarks/peers/setup.sh llama)")
    sys.path.insert(0, str(LLAMA_CPP))
    import convert_hf_to_gguf
    from conversion import base
    return convert_hf_to_gguf, base


def name_unknown_pre_tokenizer(base, name: str) -> None:
    """The convert script raises NotImplementedError for a tokenizer hash it does not know: answer `name` instead."""
    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            logging.warning("pre-tokenizer hash unknown to llama.cpp: writing it as %r (--pre-tokenizer)", name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def convert(converter, hf: Path, out: Path, outtype: str) -> None:
    sys.argv = ["convert_hf_to_gguf.py", str(hf), "--outfile", str(out), "--outtype", outtype]
    converter.main()


def quantize(source: Path, out: Path, kind: str, threads: int = 2) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama_convert.py: llama_model_quantize {source} → {kind} failed")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("hf", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pre-tokenizer", help="llama.cpp's name for a tokenizer whose hash it does not know")
    args = ap.parse_args()
    converter, base = import_converter()
    if args.pre_tokenizer:
        name_unknown_pre_tokenizer(base, args.pre_tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    for outtype in FLOAT_TYPES:  # F32: the quality check's exact copy of the checkpoint; F16: what users convert to
        if not (args.out / f"{outtype}.gguf").exists():
            convert(converter, args.hf, args.out / f"{outtype}.gguf", outtype)
    for kind in QUANT_TYPES:  # from F32, so that the only rounding is the quantizer's own
        if not (args.out / f"{kind}.gguf").exists():
            quantize(args.out / "f32.gguf", args.out / f"{kind}.gguf", kind)


if __name__ == "__main__":
    main()
