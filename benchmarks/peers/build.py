"""Builds every engine's model from one Hugging Face checkpoint, into benchmarks/peers/.work/<model>/.

    .venv/bin/python benchmarks/peers/build.py small smollm2 [--only ours llama genai]

Run with the project's venv (it makes our checkpoint and runs the `spj-edge` CLI as a user does); the peers' tools run
in their own venvs (setup.sh). Each step is skipped when its output exists, so a failed or killed build resumes.

    hf/                    the checkpoint every engine starts from (config.json, model.safetensors, tokenizer files)
    onnx/ int8/ int4/      spj-edge export, spj-edge quantize (static int8, int4), each gated on held-out text
    int4-b128/             small: int4 in blocks of 128 weights (--block-size 128) where the default is 32
    fp32.spj int8.spj int4.spj int4-b128.spj   spj-edge package of each
    gguf/{f16,q8_0,q4_0}.gguf    llama.cpp: convert_hf_to_gguf.py, then llama_model_quantize
    gguf/shipped.gguf      smollm2: a link to the shared GGUF itself (Q4_1, its LM head Q8_0), as llama.cpp's users
                           run it: the same grids as our int4, so the same quality
    genai/{fp32,int4}/     onnxruntime-genai's model builder; small: genai/int4-b128/ too (block_size=128)
    prompt.json            the prompt ids every engine is given (32 and 128 tokens of real text)
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"
SMOLLM2_GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SPJ = REPO / ".venv" / "bin" / "spj-edge"
LLAMA_PY = HERE / ".venv-llama" / "bin" / "python"
GENAI_PY = HERE / ".venv-genai" / "bin" / "python"
PROMPT_TEXT = DATA / "corpus" / "tinyshakespeare" / "val.txt"
CALIB = sorted(glob.glob(str(DATA / "corpus" / "ud" / "*_dev.txt")))
# The gate's held-out text, in the order the quantize command names it (the order cuts the gate's windows).
EVAL = sorted(glob.glob(str(DATA / "corpus" / "ud" / "*_test.txt"))) + [str(DATA / "corpus/tinyshakespeare/val.txt")]
PROMPT_LENGTHS = (32, 128)
# llama.cpp's convert script knows a tokenizer by a hash of how it splits a test string. Ours is a byte-level BPE
# with GPT-2's split pattern (tokenizers' ByteLevel pre-tokenizer), which llama.cpp calls "gpt-2".
SPJ_PRE_TOKENIZER = "gpt-2"
# int4 as each tool writes it by default (blocks of 32 weights a scale), and in blocks of 128: (name, our quantize
# flags, genai builder flags). onnxruntime's int8-compute kernel, which both run, is faster the longer its blocks.
INT4_VARIANTS = (("int4", [], []),
                 ("int4-b128", ["--block-size", "128"], ["--extra_options", "block_size=128"]))


def int4_variants(model: str) -> tuple:
    """SmolLM2's int4 keeps its GGUF's blocks of 32, so only `small` has an int4 in blocks of 128 too."""
    return INT4_VARIANTS if model == "small" else INT4_VARIANTS[:1]


def work_dir(model: str) -> Path:
    return HERE / ".work" / model


def run(*command, cwd: Path | None = None) -> None:
    print("+", " ".join(map(str, command)), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=cwd)


def require(path: Path, hint: str) -> None:
    if not path.exists():
        sys.exit(f"build.py: {path} missing ({hint})")


# --- the checkpoint --------------------------------------------------------------------------------------------------
def small_checkpoint(out: Path) -> None:
    """The `small` preset with random weights (speed does not depend on them) and a 4,096-id tokenizer trained on the
    prompt text, as benchmarks/runtime_speed.py makes it."""
    import torch

    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.config import load_preset
    from spj_edge.model import Transformer
    from spj_edge.tokenizer import train_tokenizer

    config = load_preset("small")
    tokenizer = train_tokenizer([PROMPT_TEXT.read_text(encoding="utf-8")], min(config.vocab_size, 4096))
    torch.manual_seed(0)
    save_checkpoint(out, Transformer(config), tokenizer)


def checkpoint(model: str, out: Path) -> None:
    if out.exists():
        return
    if model == "small":
        small_checkpoint(out)
    else:
        require(SMOLLM2_GGUF, "the shared SmolLM2 GGUF")
        run(SPJ, "import", "--gguf", SMOLLM2_GGUF, "--out", out)


def prompts(hf: Path, out: Path) -> None:
    """The same prompt ids for every engine: real text, framed as the model's tokenizer frames a prompt (<bos> first
    for our presets, nothing for SmolLM2), cut to each length."""
    if out.exists():
        return
    from spj_edge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf / "tokenizer.json")
    ids = tokenizer.encode_prompt(PROMPT_TEXT.read_text(encoding="utf-8")[:20000], 1 << 20)
    out.write_text(json.dumps({str(n): ids[:n] for n in PROMPT_LENGTHS}))


# --- ours ------------------------------------------------------------------------------------------------------------
def ours(work: Path, model: str) -> None:
    """export → quantize (static int8, int4) → package, with the CLI. --force: the gate's verdict is kept in each
    report.json (run.py and the README say which failed) but the speed table needs the model either way; on random
    weights (`small`) the gate means nothing."""
    if not (work / "onnx").exists():
        run(SPJ, "export", "--model", work / "hf", "--out", work / "onnx")
    int4 = int4_variants(model)
    for mode, extra in (("int8", []), *((name, ["--mode", "int4", *flags]) for name, flags, _ in int4)):
        if not (work / mode).exists():
            run(SPJ, "quantize", "--model", work / "onnx", "--out", work / mode, *extra, "--calib", *CALIB,
                "--eval", *EVAL, "--force")
    for source, name in (("onnx", "fp32"), ("int8", "int8"), *((name, name) for name, _, _ in int4)):
        if not (work / f"{name}.spj").exists():
            run(SPJ, "package", "--model", work / source, "--out", work / f"{name}.spj")


# --- peers -----------------------------------------------------------------------------------------------------------
def llama(work: Path, model: str) -> None:
    require(LLAMA_PY, "run benchmarks/peers/setup.sh llama")
    gguf = work / "gguf"
    if not (gguf / "q4_0.gguf").exists():
        pre = ["--pre-tokenizer", SPJ_PRE_TOKENIZER] if model == "small" else []
        run(LLAMA_PY, HERE / "llama_convert.py", work / "hf", gguf, *pre)
    if model == "smollm2" and not (gguf / "shipped.gguf").exists():
        (gguf / "shipped.gguf").symlink_to(SMOLLM2_GGUF)


def genai(work: Path, model: str) -> None:
    require(GENAI_PY, "run benchmarks/peers/setup.sh genai")
    int4 = int4_variants(model)
    for name, precision, extra in (("fp32", "fp32", []), *((name, "int4", builder) for name, _, builder in int4)):
        out = work / "genai" / name
        if not (out / "genai_config.json").exists():
            run(GENAI_PY, "-m", "onnxruntime_genai.models.builder", "-i", work / "hf", "-o", out, "-p", precision,
                "-e", "cpu", "-c", work / "genai" / f".cache-{name}", *extra)


STEPS = ("ours", "llama", "genai")


def build(model: str, only: list[str]) -> None:
    work = work_dir(model)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint(model, work / "hf")
    prompts(work / "hf", work / "prompt.json")
    if "ours" in only:
        ours(work, model)
    if "llama" in only:
        llama(work, model)
    if "genai" in only:
        genai(work, model)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", choices=["small", "smollm2"])
    ap.add_argument("--only", nargs="+", choices=STEPS, default=list(STEPS))
    args = ap.parse_args()
    require(SPJ, "make the project's venv first: make test, or see README.md")
    for model in args.models:
        build(model, args.only)


if __name__ == "__main__":
    main()
