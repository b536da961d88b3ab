"""`python -m spj_edge.runtime --model PKG --prompt TEXT`: generate text with onnxruntime, numpy and tokenizers only.

Without --prompt, each line of stdin is a prompt and its continuation is one line of output, so the same command
serves a pipe, a terminal or a socket (see runtimes/raspberry-pi/).
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ArgumentParser, run_command
from .generator import Generator, text_pieces
from .speed import Timing

OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m spj_edge.runtime",
                                description="Generate text from a spj-edge package with onnxruntime alone.")
    p.add_argument("--model", required=True, metavar="PKG", help="a package directory or its .tar.gz")
    p.add_argument("--prompt", help="the prompt (default: one prompt per line of stdin)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the package's")
    p.add_argument("--temperature", type=float, metavar="T", help="0: greedy (default: the package's)")
    p.add_argument("--top-k", type=int, metavar="K", help="0: no limit (default: the package's)")
    p.add_argument("--top-p", type=float, metavar="P", help="default: the package's")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="default: the package's")
    p.add_argument("--seed", type=int, metavar="S", help="make sampling reproducible")
    p.add_argument("--threads", type=int, metavar="N",
                   help="onnxruntime intra-op threads (default: the idle cores, up to 4)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-stream", action="store_true", help="print each continuation once it is complete")
    p.add_argument("--verbose", action="store_true",
                   help="print the package, its KV cache size and the speed to stderr")
    return p


def respond(generator: Generator, prompt: str, options: dict, stream: bool, verbose: bool) -> None:
    ids = generator.encode(prompt)
    timing = Timing(len(ids))
    pieces = text_pieces(generator.tokenizer, timing.track(generator.tokens(ids, **options)))
    if stream:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        sys.stdout.write("".join(pieces) + "\n")
    sys.stdout.flush()
    if verbose:
        print(timing.summary(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def serve():
        generator = Generator.load(args.model, threads=args.threads)
        if args.verbose:
            print(generator.describe(), file=sys.stderr)
        options = {name: getattr(args, name) for name in OPTIONS}
        prompts = [args.prompt] if args.prompt is not None else (line.rstrip("\r\n") for line in sys.stdin)
        for prompt in prompts:
            respond(generator, prompt, options, not args.no_stream, args.verbose)

    return run_command(serve)


if __name__ == "__main__":
    sys.exit(main())
