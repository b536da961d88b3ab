"""`python -m spj_edge.runtime serve --model PKG`: the model resident behind an OpenAI-compatible HTTP API.

    POST /v1/completions        {"prompt": "Once upon a time", "max_tokens": 32}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "Hi!"}]}  (the package's chat template)
    GET  /v1/models             the one model served
    GET  /health                200 {"status": "ok"}; 503 {"status": "loading"} until the model is loaded (no key)

Fields: max_tokens (chat: or max_completion_tokens), temperature, top_p, seed, stop (a string or up to 4), n (1 only),
stream (server-sent events ending in `data: [DONE]`; stream_options.include_usage adds a usage chunk) and, as vLLM
takes them, top_k, repetition_penalty and ignore_eos. A field left out takes the package's default. `model` is not
read: one model is served, and nothing a request says names a file. Errors have OpenAI's shape, {"error": {"message",
"type", "param", "code"}}, and status: 400 a bad field, 401 a wrong key, 404, 413 a body over MAX_BODY_BYTES or a
prompt that fills the context, 429 the queue is full, 503 loading or shutting down.

The standard library's http.server, not a web framework: the runtime's install stays onnxruntime, numpy and tokenizers
(a Pi gets no new wheel), the API is four routes of JSON and server-sent events, and the work is the model's. One
thread decodes every request together (batching.py); a connection's thread only turns its ids into text and writes it.
"""
from __future__ import annotations

import hmac
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ArgumentParser, SPJError, run_command
from ..options import add_flags, flag, from_flags
from .batching import Batcher, Generation, QueueFull, Unavailable
from .generator import PROMPT_MAX_BYTES, Generator, _panics_as_errors, text_pieces
from .reader import TOKENIZER

MAX_BODY_BYTES = 2 * PROMPT_MAX_BYTES  # the longest prompt the runtime takes, with room for JSON's escapes
DISCARD_BYTES = 64 << 20  # of a refused body, read this much at most so that the client gets the refusal
MAX_STOPS, MAX_STOP_CHARS = 4, 256
IDLE_S = 60  # a connection that sends nothing for this long is closed
STOP_GRACE_S = 0.5  # on Ctrl-C or SIGTERM: how long the cancelled requests get to send their last bytes
API_KEY_VARIABLE = "SPJ_EDGE_API_KEY"


@dataclass(frozen=True)
class ServeOptions:
    model: str = flag(None, "a package directory or its .tar.gz", required=True, metavar="PKG")
    host: str = flag("127.0.0.1", "the address to listen on (default %(default)s: this machine only)")
    port: int = flag(8000, "default %(default)s; 0: a free port, which is printed")
    threads: int | None = flag(None, "onnxruntime intra-op threads (default: the idle cores, up to 4)", type=int,
                               metavar="N")
    max_batch: int = flag(8, "requests decoded together, in one step (default %(default)s)", metavar="B")
    max_queue: int = flag(16, "requests that may wait for a place in the batch; more are refused at once with 429 "
                              "(default %(default)s)", metavar="Q")
    api_key: str | None = flag(None, "require `Authorization: Bearer KEY` (default: $SPJ_EDGE_API_KEY, which unlike "
                                     "a flag other users cannot read in the process list; unset: no key)",
                               metavar="KEY")

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise SPJError(f"--port must be in [0, 65535], got {self.port}")
        if self.max_batch < 1:
            raise SPJError(f"--max-batch must be ≥ 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise SPJError(f"--max-queue must be ≥ 0, got {self.max_queue}")
        if self.api_key == "":
            raise SPJError("--api-key must not be empty")


# --- requests ----------------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """A refused request: its HTTP status and OpenAI's error object."""

    TYPES = {401: "authentication_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


SAMPLING = {"temperature": float, "top_p": float, "top_k": int, "repetition_penalty": float, "seed": int}
FIELDS = {"model": str, "max_tokens": int, **SAMPLING, "stop": (str, list), "n": int, "stream": bool,
          "stream_options": dict, "ignore_eos": bool, "user": str}
JSON_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
              dict: "an object", (str, list): "a string or an array of strings"}


@dataclass(frozen=True)
class Job:
    """What a request asks for, checked."""
    prompt: list[int]
    options: dict  # Generator.tokens' options
    stops: list[str]
    stream: bool
    include_usage: bool


def completion_job(generator: Generator, body: dict) -> Job:
    fields = _checked(body, {**FIELDS, "prompt": str}, required="prompt")
    encode = generator.tokenizer.encode_prompt
    return _job(generator, _prompt_ids(generator, lambda context: encode(fields["prompt"], context), "prompt"), fields)


def chat_job(generator: Generator, body: dict) -> Job:
    fields = _checked(body, {**FIELDS, "messages": list, "max_completion_tokens": int}, required="messages")
    encode = generator.tokenizer.encode_chat
    return _job(generator, _prompt_ids(generator, lambda context: encode(fields["messages"], context), "messages"),
                fields)


def _checked(body: dict, fields: dict, required: str | None = None) -> dict:
    """The body's fields, each of its JSON type; a null field counts as left out."""
    for name, value in body.items():
        if name not in fields:
            raise ApiError(400, f"unknown field {name[:100]!r}; this server takes {', '.join(fields)}", name[:100])
        if value is not None and not _is(value, fields[name]):
            raise ApiError(400, f"{name} must be {JSON_TYPES[fields[name]]}, got {json.dumps(value)[:50]}", name)
    if required and body.get(required) is None:
        raise ApiError(400, f"{required} is required", required)
    return {name: value for name, value in body.items() if value is not None}


def _is(value, kind) -> bool:
    if isinstance(value, bool):  # a bool is an int to Python, never to JSON
        return kind is bool
    return isinstance(value, (int, float) if kind is float else kind)


def _prompt_ids(generator: Generator, encode: Callable[[int], list[int]], field: str) -> list[int]:
    """The prompt's ids, tokenized with no limit of the tokenizer's own, so that a prompt that fills the context
    is told apart (413) from a bad one (400)."""
    try:
        with _panics_as_errors(f"{generator.package.source}: {TOKENIZER}"):
            ids = encode(sys.maxsize)
    except SPJError as e:
        raise ApiError(400, str(e), field) from None
    if len(ids) >= generator.context:
        raise ApiError(413, f"the {field} is {len(ids)} tokens; the model's context is {generator.context}, which "
                            "leaves no room to generate", field, "context_length_exceeded")
    return ids


def _job(generator: Generator, prompt: list[int], fields: dict) -> Job:
    if fields.get("n", 1) != 1:
        raise ApiError(400, f"n must be 1 (one choice a request), got {fields['n']}", "n")
    limit = "max_completion_tokens" if "max_completion_tokens" in fields else "max_tokens"
    room = generator.context - len(prompt)
    if limit in fields and not 1 <= fields[limit] <= room:
        raise ApiError(400, f"{limit} must be in [1, {room}] (the model's context of {generator.context} tokens less "
                            f"the prompt's {len(prompt)}), got {fields[limit]}", limit)
    stream_options = _checked(fields.get("stream_options", {}), {"include_usage": bool})
    sampling = {option: fields[option] for option in SAMPLING if option in fields}
    return Job(prompt, {**sampling, "max_new_tokens": fields.get(limit), "ignore_eos": fields.get("ignore_eos", False)},
               _stops(fields.get("stop")), fields.get("stream", False), stream_options.get("include_usage", False))


def _stops(stop: str | list | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop must be a string or up to {MAX_STOPS} strings, each of 1 to {MAX_STOP_CHARS} "
                            "characters", "stop")
    return stops


class Reply:
    """A generation's text as it becomes final, ending before the first stop string; once read, `finish_reason` and
    `tokens` (the new ids read)."""

    def __init__(self, generation: Generation, generator: Generator, stops: list[str]):
        self.generation, self.tokenizer, self.stops = generation, generator.tokenizer, stops
        self.tokens = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        held = ""  # the end of the text so far, while it could be the start of a stop string
        for piece in text_pieces(self.tokenizer, self._ids()):
            text = held + piece
            cut = min((at for at in map(text.find, self.stops) if at >= 0), default=None)
            if cut is not None:
                self.finish_reason = "stop"
                yield text[:cut]
                return
            held = text[len(text) - _stop_start(text, self.stops):]
            yield text[:len(text) - len(held)]
        yield held
        self.finish_reason = self.generation.finish_reason

    def _ids(self) -> Iterator[int]:
        for token in self.generation.tokens():
            self.tokens += 1
            yield token


def _stop_start(text: str, stops: list[str]) -> int:
    """How many of the last characters of `text` are the start of a stop string."""
    return max((n for stop in stops for n in range(1, min(len(stop), len(text) + 1)) if text.endswith(stop[:n])),
               default=0)


# --- the endpoints -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    job: Callable[[Generator, dict], Job]
    object: str  # the reply's "object"
    chunk_object: str  # a streamed chunk's
    id_prefix: str
    choice: Callable[[str, str], dict]  # the whole reply's choice: its text and finish_reason
    delta: Callable[[str | None, str | None], dict]  # a streamed chunk's choice: a piece, or the finish_reason


def _completion_choice(text: str | None, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def _chat_choice(text: str, finish_reason: str) -> dict:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish_reason}


def _chat_delta(text: str | None, finish_reason: str | None) -> dict:
    """The stream's first chunk says the role (text ""), the last holds only the finish_reason (text None)."""
    delta = {} if text is None else {"content": text} if text else {"role": "assistant", "content": ""}
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


COMPLETIONS = Endpoint(completion_job, "text_completion", "text_completion", "cmpl-", _completion_choice,
                       _completion_choice)
CHAT = Endpoint(chat_job, "chat.completion", "chat.completion.chunk", "chatcmpl-", _chat_choice, _chat_delta)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and streams as chunks
    server_version, sys_version = "spj-edge", ""
    timeout = IDLE_S
    server: Server

    def do_GET(self):
        self._route({"/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._route({"/v1/completions": lambda: self._generate(COMPLETIONS),
                     "/v1/chat/completions": lambda: self._generate(CHAT)})

    def _route(self, routes: dict[str, Callable[[], None]]) -> None:
        self.unread = 0  # bytes of the body not read yet
        try:
            try:
                self.unread = self._content_length()
                route = routes.get(self.path.partition("?")[0])
                if route is None:
                    raise ApiError(404, f"no {self.command} {self.path[:100]} here: POST /v1/completions, POST "
                                        "/v1/chat/completions, GET /v1/models, GET /health")
                route()
            except ApiError as e:
                self._send_json(e.status, e.body(), {"Retry-After": "1"} if e.status in (429, 503) else {})
        except OSError:  # the client is gone, or sent nothing for IDLE_S
            self.close_connection = True

    def _content_length(self) -> int:
        length = self.headers.get("Content-Length", "0")
        if "Transfer-Encoding" in self.headers or not (length.isascii() and length.isdigit()):
            self.close_connection = True  # where the body ends is unknown
            raise ApiError(411, "send the body with a Content-Length (a number of bytes), not chunked")
        return int(length)

    # --- GET ---------------------------------------------------------------------------------------------------------
    def _health(self):
        ready = self.server.batcher is not None
        self._send_json(200 if ready else 503, {"status": "ok" if ready else "loading"})

    def _models(self):
        self._authorize()
        self._send_json(200, {"object": "list", "data": [{"id": self.server.model_id, "object": "model",
                                                          "created": self.server.started, "owned_by": "spj-edge"}]})

    # --- POST --------------------------------------------------------------------------------------------------------
    def _generate(self, endpoint: Endpoint):
        self._authorize()
        body = self._json_body()
        generator, batcher = self.server.ready()
        job = endpoint.job(generator, body)
        try:
            generation = batcher.submit(job.prompt, **job.options)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        except SPJError as e:  # a sampling option out of range
            raise ApiError(400, str(e)) from None
        reply = Reply(generation, generator, job.stops)
        head = {"id": endpoint.id_prefix + uuid.uuid4().hex[:24], "object": endpoint.object,
                "created": int(time.time()), "model": self.server.model_id}
        try:
            with self.server.serving():
                (self._stream if job.stream else self._answer)(endpoint, job, reply, head)
        finally:
            generation.cancel()  # if it is still going: its client left, or a stop string ended it

    def _answer(self, endpoint: Endpoint, job: Job, reply: Reply, head: dict):
        text = []
        try:
            for piece in reply:
                if self._client_left():
                    self.close_connection = True
                    return
                text.append(piece)
        except SPJError as e:
            raise _generation_error(e) from None
        self._send_json(200, {**head, "choices": [endpoint.choice("".join(text), reply.finish_reason)],
                              "usage": _usage(job, reply)})

    def _stream(self, endpoint: Endpoint, job: Job, reply: Reply, head: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = {**head, "object": endpoint.chunk_object}
        try:
            try:
                if endpoint is CHAT:
                    self._event({**chunk, "choices": [endpoint.delta("", None)]})
                for piece in reply:
                    if piece:
                        self._event({**chunk, "choices": [endpoint.delta(piece, None)]})
                self._event({**chunk, "choices": [endpoint.delta(None, reply.finish_reason)]})
                if job.include_usage:
                    self._event({**chunk, "choices": [], "usage": _usage(job, reply)})
            except SPJError as e:
                self._event(_generation_error(e).body())
            self._event("[DONE]")
            self._write_chunk(b"")
        except OSError:  # the client left: its generation is cancelled, the connection is done
            self.close_connection = True

    def _event(self, data: dict | str) -> None:
        if self._client_left():
            raise ConnectionAbortedError
        text = data if isinstance(data, str) else json.dumps(data)
        self._write_chunk(f"data: {text}\n\n".encode())

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _client_left(self) -> bool:
        """Whether the client has closed the connection: it sends nothing while it waits for the reply, so a socket
        that is readable with nothing to read has been hung up on."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    # --- the request's parts -----------------------------------------------------------------------------------------
    def _authorize(self) -> None:
        key = self.server.api_key
        given = self.headers.get("Authorization", "")
        if key is not None and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "wrong or missing API key (send the header Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def _json_body(self) -> dict:
        if self.unread > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {self.unread} bytes, more than the {MAX_BODY_BYTES} this server reads")
        raw = self.rfile.read(self.unread)
        if len(raw) < self.unread:
            self.close_connection = True
            raise ApiError(400, f"the body ended {self.unread - len(raw)} bytes short of its Content-Length")
        self.unread = 0
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
            raise ApiError(400, f"the body is not JSON ({str(e)[:100]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _send_json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.unread or self.close_connection:
            self.send_header("Connection", "close")  # an unread body would be in the way of the next request
        self.end_headers()
        self.wfile.write(data)
        if self.unread:
            self._discard_unread()

    def _discard_unread(self) -> None:
        """Read the body that was refused unread, for a moment and up to DISCARD_BYTES: a socket closed with data
        still coming in resets the connection, and the client would lose the refusal."""
        self.connection.settimeout(1)
        left = min(self.unread, DISCARD_BYTES)
        try:
            while left > 0 and (data := self.rfile.read1(min(left, 1 << 16))):
                left -= len(data)
        except OSError:
            pass

    def log_message(self, format, *args):  # one line a request, for the journal, which dates it
        sys.stderr.write(f"spj-edge serve: {self.address_string()} {format % args}\n")


def _usage(job: Job, reply: Reply) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": reply.tokens,
            "total_tokens": len(job.prompt) + reply.tokens}


def _generation_error(error: SPJError) -> ApiError:
    return ApiError(503, str(error)) if isinstance(error, Unavailable) else ApiError(500, str(error))


# --- the server --------------------------------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    """Listens as soon as it is made (answering 503 until `load`), one thread per connection."""

    daemon_threads = True  # an idle keep-alive connection does not hold up the exit
    request_queue_size = socket.SOMAXCONN  # socketserver's 5 would reset a burst of clients instead of answering 429

    def __init__(self, options: ServeOptions):
        self.options = options
        self.api_key = options.api_key or os.environ.get(API_KEY_VARIABLE) or None
        self.model_id = Path(options.model).name.removesuffix(".tar.gz")
        self.started = int(time.time())
        self.generator: Generator | None = None
        self.batcher: Batcher | None = None
        self.busy = 0  # requests being answered with generated text
        self.idle = threading.Condition()
        try:
            self.address_family = socket.getaddrinfo(options.host, options.port, type=socket.SOCK_STREAM)[0][0]
            super().__init__((options.host, options.port), Handler)
        except OSError as e:
            raise SPJError(f"cannot listen on {options.host}:{options.port} ({e.strerror or e})") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def load(self) -> None:
        generator = Generator.load(self.options.model, threads=self.options.threads)
        self.generator = generator
        self.batcher = Batcher(generator, self.options.max_batch, self.options.max_queue)

    def ready(self) -> tuple[Generator, Batcher]:
        if self.batcher is None:
            raise ApiError(503, "the model is loading; try again in a moment")
        return self.generator, self.batcher

    @contextmanager
    def serving(self):
        with self.idle:
            self.busy += 1
        try:
            yield
        finally:
            with self.idle:
                self.busy -= 1
                self.idle.notify_all()

    def stop(self) -> None:
        """Cancel the running and waiting requests (each is told 503), let them say so, stop listening."""
        if self.batcher is not None:
            self.batcher.close()
        with self.idle:
            self.idle.wait_for(lambda: not self.busy, STOP_GRACE_S)
        self.shutdown()
        self.server_close()


def serve(options: ServeOptions) -> None:
    """Serve until Ctrl-C or SIGTERM, which cancel the running requests and return. The port answers 503 while the
    package loads; the line saying where it serves comes once it is loaded."""
    server = Server(options)
    threading.Thread(target=server.serve_forever, args=(0.1,), name="spj-edge http", daemon=True).start()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # systemd's stop, as Ctrl-C
    try:
        server.load()
        _log(f"{server.url}/v1 serves {server.model_id} ({server.generator.describe()}); batches of up to "
             f"{options.max_batch}, {options.max_queue} waiting at most{', API key required' if server.api_key else ''}")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _log("stopping")
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def _log(line: str) -> None:
    print(f"spj-edge serve: {line}", file=sys.stderr, flush=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m spj_edge.runtime serve",
                            description="Serve a package over HTTP with OpenAI's API (completions and chat).")
    add_flags(parser, ServeOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: serve(from_flags(ServeOptions, args)))
