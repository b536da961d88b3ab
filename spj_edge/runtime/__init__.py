"""The device runtime: a package in, text out, with onnxruntime, numpy and tokenizers only (never torch, transformers
or onnx, so that `pip install spj-edge` without extras is enough on a Raspberry Pi).

    from spj_edge.runtime import Generator

    generator = Generator.load("dist/student.spj.tar.gz")
    print(generator.generate("Once upon a time", max_new_tokens=64, temperature=0))
    print(generator.chat([{"role": "user", "content": "Hi!"}]))  # a model with a chat template (jinja2)

The same from a shell: `python -m spj_edge.runtime --model dist/student.spj.tar.gz --prompt "Once upon a time"`.
"""
from .generator import Generator
from .reader import Package, read_package

__all__ = ["Generator", "Package", "read_package"]
