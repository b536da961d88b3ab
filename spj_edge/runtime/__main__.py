"""`python -m spj_edge.runtime --model PKG --prompt TEXT`: generate text with onnxruntime, numpy and tokenizers only.

With --prompt, the continuation is printed as plain text. With --chat, stdin is a conversation (CHAT below). Otherwise
the runtime serves stdin and stdout (a pipe, a terminal or a socket) with the protocol of PROTOCOL below.
`python -m spj_edge.runtime serve --model PKG` is the HTTP server instead (serve.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Sequence

from ..errors import ArgumentParser, SPJError, run_command
from .generator import PROMPT_MAX_BYTES, Generator, text_pieces
from .speed import Timing

OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "ignore_eos")
PROTOCOL = f"""\
Without --prompt, each line of stdin (UTF-8, at most {PROMPT_MAX_BYTES} bytes) is a prompt, and every reply is one
JSON object per line of stdout, so that a continuation holding newlines can't be mistaken for several replies:
  {{"line": N, "piece": "..."}}                    a piece of the continuation, as it is generated (not with --no-stream)
  {{"line": N, "prompt": "...", "text": "..."}}    the whole continuation: the last record for line N
  {{"line": N, "error": "..."}}                    line N was not served (not UTF-8, too long, ...); the next one is
Strings are JSON-escaped (ASCII only), so a record never spans two lines.
"""
SERVE = """\
`python -m spj_edge.runtime serve --model PKG` keeps the model loaded behind an OpenAI-compatible HTTP API instead
(see `serve --help`).
"""
RESET = "/reset"
CHAT = f"""\
With --chat, each line of stdin is your next message in a conversation that the package's chat template frames; the
reply streams to stdout (comes whole, with --no-stream) and ends with a newline. `{RESET}` starts a new
conversation. A line the model cannot answer (the conversation has outgrown the context, say) gets a one-line error
on stderr, and the conversation goes on without it.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m spj_edge.runtime", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Generate text from a spj-edge package with onnxruntime alone.",
                       epilog=PROTOCOL + "\n" + CHAT + "\n" + SERVE)
    p.add_argument("--model", required=True, metavar="PKG", help="a package directory or its .tar.gz")
    p.add_argument("--prompt", help="the prompt; its continuation is printed as plain text (default: serve stdin, "
                                    "one prompt per line, one JSON record per line out: see below)")
    p.add_argument("--chat", action="store_true",
                   help="talk with the model through its chat template: one message a line of stdin, replies "
                        "streamed (see below)")
    p.add_argument("--system", metavar="TEXT", help="with --chat: the system message that opens each conversation")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="default: the package's")
    p.add_argument("--temperature", type=float, metavar="T", help="0: greedy (default: the package's)")
    p.add_argument("--top-k", type=int, metavar="K", help="0: no limit (default: the package's)")
    p.add_argument("--top-p", type=float, metavar="P", help="default: the package's")
    p.add_argument("--repetition-penalty", type=float, metavar="R", help="default: the package's")
    p.add_argument("--seed", type=int, metavar="S", help="make sampling reproducible")
    p.add_argument("--threads", type=int, metavar="N",
                   help="onnxruntime intra-op threads, at most 4 per core (default: the idle cores, up to 4)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-stream", action="store_true", help="print each continuation once it is complete")
    p.add_argument("--verbose", action="store_true",
                   help="print the package, its KV cache size and the speed to stderr")
    return p


def continuation(generator: Generator, prompt: str | Sequence[int], options: dict) -> tuple[Timing, Iterator[str]]:
    ids = generator.encode(prompt)
    timing = Timing(len(ids))
    return timing, text_pieces(generator.tokenizer, timing.track(generator.tokens(ids, **options)))


def answer(generator: Generator, prompt: str, options: dict, stream: bool, verbose: bool) -> None:
    """--prompt: the continuation as plain text and a newline."""
    with _native_stderr_silenced():
        timing, pieces = continuation(generator, prompt, options)
        for piece in pieces if stream else ["".join(pieces)]:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    if verbose:
        print(timing.summary(), file=sys.stderr)


def serve(generator: Generator, lines: BinaryIO, options: dict, stream: bool, verbose: bool) -> None:
    """The stdin protocol (PROTOCOL): a line that can't be served gets an error record, and serving goes on."""
    for number, line in enumerate(_lines(lines), 1):
        try:
            prompt = _prompt(line)
            with _native_stderr_silenced():
                timing, pieces = continuation(generator, prompt, options)
                text = []
                for piece in pieces:
                    text.append(piece)
                    if stream:
                        _record(line=number, piece=piece)
        except SPJError as e:
            _record(line=number, error=str(e))
            continue
        _record(line=number, prompt=prompt, text="".join(text))
        if verbose:
            print(timing.summary(), file=sys.stderr)


def chat(generator: Generator, lines: BinaryIO, options: dict, system: str | None, stream: bool,
         verbose: bool) -> None:
    """--chat (CHAT): the conversation so far is the prompt of each reply."""
    generator.tokenizer.require_chat_template()
    opening = [{"role": "system", "content": system}] if system is not None else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chat with {generator.package.source}; {RESET} starts over, Ctrl-D ends.", file=sys.stderr)

    def ask():
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)

    history = opening
    ask()
    for line in _lines(lines):
        history = _chat_turn(generator, line, history, opening, options, stream, verbose)
        ask()


def _chat_turn(generator: Generator, line: bytes | None, history: list[dict], opening: list[dict], options: dict,
               stream: bool, verbose: bool) -> list[dict]:
    """Answer one line of --chat; the conversation after it."""
    try:
        message = _prompt(line).strip()
        if message == RESET or not message:
            return opening if message == RESET else history
        conversation = [*history, {"role": "user", "content": message}]
        with _native_stderr_silenced():
            timing, pieces = continuation(generator, generator.encode_chat(conversation), options)
            reply = []
            for piece in pieces:
                reply.append(piece)
                if stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    except SPJError as e:
        print(f"spj-edge: {e}", file=sys.stderr)
        return history
    sys.stdout.write("\n" if stream else "".join(reply) + "\n")
    sys.stdout.flush()
    if verbose:
        print(timing.summary(), file=sys.stderr)
    return [*conversation, {"role": "assistant", "content": "".join(reply)}]


def _lines(stream: BinaryIO) -> Iterator[bytes | None]:
    """stdin's lines without their line break, reading no more than a prompt may have: None for a longer line, whose
    rest is read and dropped."""
    while line := stream.readline(PROMPT_MAX_BYTES + 2):  # + "\r\n"
        if line.endswith(b"\n") or len(line) <= PROMPT_MAX_BYTES:
            yield line.rstrip(b"\r\n")
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(1 << 16)
        yield None


def _prompt(line: bytes | None) -> str:
    if line is None:
        raise SPJError(f"prompt is more than the {PROMPT_MAX_BYTES} bytes this runtime accepts")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SPJError(f"prompt is not UTF-8 text (invalid byte 0x{line[e.start]:02x} at offset {e.start})") from None


def _record(**fields) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


@contextmanager
def _native_stderr_silenced():
    """Rust's panic handler (a tokenizer pattern that backtracks too long) writes its report straight to file
    descriptor 2, besides the exception that becomes our one-line error. Nothing of ours writes to stderr meanwhile:
    errors are printed after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .serve import main as serve_http

        return serve_http(argv[1:])
    args = build_parser().parse_args(argv)

    def run():
        generator = Generator.load(args.model, threads=args.threads)
        if args.verbose:
            print(generator.describe(), file=sys.stderr)
        options = {name: getattr(args, name) for name in OPTIONS}
        if args.chat:
            chat(generator, sys.stdin.buffer, options, args.system, not args.no_stream, args.verbose)
        elif args.prompt is not None:
            answer(generator, args.prompt, options, not args.no_stream, args.verbose)
        else:
            serve(generator, sys.stdin.buffer, options, not args.no_stream, args.verbose)

    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
