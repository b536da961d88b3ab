"""`spj-edge serve`: the official openai client against a real server process on 127.0.0.1 gets what
Generator.generate gives for the same prompt and seed, alone or among concurrent requests batched together; bad
requests get OpenAI's error shape with the right status, and the server goes on serving. The server runs with
torch, transformers and onnx blocked (test_runtime.BLOCKER), so every test here also proves it needs none of them."""
from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from conftest import REPO, assert_one_line_error, cli
from spj_edge.runtime import Generator
from spj_edge.runtime.batching import Batcher
from spj_edge.runtime.serve import MAX_BODY_BYTES, Server, ServeOptions
from test_runtime import BLOCKER

KEY = "sk-test-key"
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["First Citizen:\nBefore we proceed", "Le chat est", "我们的", "ROMEO:"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
GREEDY = dict(temperature=0)
SAMPLED = dict(temperature=0.9, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def package(nano_package, tmp_path_factory) -> Path:
    """The session's nano package with a chat template in its manifest (our presets' tokenizers have none)."""
    copy = tmp_path_factory.mktemp("serve") / "nano.spj"
    shutil.copytree(nano_package, copy)
    manifest = json.loads((copy / "spj.json").read_text())
    (copy / "spj.json").write_text(json.dumps({**manifest, "chat_template": TEMPLATE}))
    return copy


@pytest.fixture(scope="module")
def generator(package) -> Generator:
    return Generator.load(package, threads=1)


@dataclass
class Running:
    process: subprocess.Popen
    url: str
    log: Path

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> float:
        """SIGTERM; the seconds until the process exited (0 asserted)."""
        start = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=10) == 0, self.log.read_text()[-2000:]
        return time.monotonic() - start


def start_server(package: Path, directory: Path, *flags: str) -> Running:
    """`python -m spj_edge.runtime serve` on a free port, without the toolchain; returns once it serves."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(BLOCKER)
    log = directory / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "spj_edge.runtime", "serve", "--model", str(package), "--port",
                                "0", "--threads", "1", *flags], stdout=subprocess.DEVNULL, stderr=log.open("w"),
                               cwd=REPO, env={"PYTHONPATH": f"{directory}:{REPO}", "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 60
    while " serves " not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    url = log.read_text().split(" serves ")[0].split()[-1].removesuffix("/v1")
    return Running(process, url, log)


@pytest.fixture(scope="module")
def server(package, tmp_path_factory):
    running = start_server(package, tmp_path_factory.mktemp("server"), "--api-key", KEY)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


def post(url: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    """A request as raw as it comes: the status and the JSON body."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, data, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
                                            **(headers or {})})
    response = connection.getresponse()
    status, payload = response.status, json.loads(response.read())
    connection.close()
    return status, payload


# --- what the server says equals what the Generator says ------------------------------------------------------------
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_completions_whole_and_streamed_equal_generate(client, generator, sampling):
    for prompt in PROMPTS:
        ids = list(generator.tokens(prompt, max_new_tokens=24, **sampling))
        expected = generator.generate(prompt, max_new_tokens=24, **sampling)
        reply = client.completions.create(model="nano", prompt=prompt, max_tokens=24, **sampling)
        (choice,) = reply.choices
        assert choice.text == expected, prompt
        assert choice.finish_reason == ("length" if len(ids) == 24 else "stop")
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(generator.encode(prompt)), len(ids))
        chunks = list(client.completions.create(model="nano", prompt=prompt, max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}, **sampling))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
        assert chunks[-1].usage.completion_tokens == len(ids)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_chat_whole_and_streamed_equal_generator_chat(client, generator, sampling):
    expected = generator.chat(CONVERSATION, max_new_tokens=20, **sampling)
    reply = client.chat.completions.create(model="nano", messages=CONVERSATION, max_tokens=20, **sampling)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(generator.encode_chat(CONVERSATION))
    chunks = list(client.chat.completions.create(model="nano", messages=CONVERSATION, max_tokens=20, stream=True,
                                                 **sampling))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(client, generator):
    expected = generator.generate(PROMPTS[3], max_new_tokens=40, ignore_eos=True, **SAMPLED)
    stop = expected[12:15]  # three characters the text has: it ends before their first occurrence
    cut = expected[:expected.index(stop)]
    options = dict(model="nano", prompt=PROMPTS[3], max_tokens=40, stop=[stop, "never said"], extra_body={
        "ignore_eos": True}, **SAMPLED)
    reply = client.completions.create(**options)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (cut, "stop")
    assert reply.usage.completion_tokens < 40
    streamed = list(client.completions.create(stream=True, **options))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_models_health_and_the_key(server, client):
    assert [m.id for m in client.models.list()] == ["nano.spj"]
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    connection.request("GET", "/health")  # no key needed: a health check knows none
    response = connection.getresponse()
    assert (response.status, json.loads(response.read())) == (200, {"status": "ok"})
    for key in ("sk-wrong", KEY + "x", ""):
        with pytest.raises(openai.AuthenticationError) as refused:
            server.client(key or "-").completions.create(model="nano", prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 401 and "wrong or missing API key" in str(refused.value)
    status, body = post(server.url, "/v1/completions", {"prompt": "Hi"}, {"Authorization": ""})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


# --- bad requests ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, status, message", [
    (b"{\"prompt\": ", 400, "the body is not JSON"),
    (b"[1, 2]", 400, "the body must be a JSON object"),
    (b"\xff\xfe\x00", 400, "the body is not JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "the body is not JSON"),
    ({"max_tokens": 5}, 400, "prompt is required"),
    ({"prompt": 5}, 400, "prompt must be a string, got 5"),
    ({"prompt": ["a", "b"]}, 400, "prompt must be a string"),
    ({"prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens must be an integer, got \"5\""),
    ({"prompt": "Hi", "max_tokens": True}, 400, "max_tokens must be an integer, got true"),
    ({"prompt": "Hi", "max_tokens": 2.5}, 400, "max_tokens must be an integer"),
    ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature must be a number"),
    ({"prompt": "Hi", "stream": "yes"}, 400, "stream must be true or false"),
    ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens must be in [1, "),
    ({"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens must be in [1, "),
    ({"prompt": "Hi", "max_tokens": 10 ** 30}, 400, "(the model's context of 128 tokens less the prompt's"),
    ({"prompt": "Hi", "temperature": -1}, 400, "temperature must be ≥ 0, got -1"),
    ({"prompt": "Hi", "top_p": 0}, 400, "top_p must be in (0, 1], got 0"),
    ({"prompt": "Hi", "seed": -3}, 400, "seed must be an integer ≥ 0, got -3"),
    ({"prompt": "Hi", "n": 2}, 400, "n must be 1"),
    ({"prompt": "Hi", "stop": [""]}, 400, "stop must be a string or up to 4 strings"),
    ({"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop must be a string or up to 4 strings"),
    ({"prompt": "Hi", "logprobs": 3}, 400, "unknown field 'logprobs'"),
    ({"prompt": "Hi", "model_path": "/etc/passwd"}, 400, "unknown field 'model_path'"),
    ({"prompt": "Hi", "stream": True, "stream_options": {"x": 1}}, 400, "unknown field 'x'"),
    ({"prompt": "word " * 600}, 413, "tokens; the model's context is 128, which leaves no room"),
])
def test_a_bad_completion_request_is_refused_with_its_status_and_reason(server, body, status, message):
    answered, payload = post(server.url, "/v1/completions", body)
    assert answered == status and message in payload["error"]["message"], payload
    assert set(payload["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, status, message", [
    ({"messages": "Hi"}, 400, "messages must be an array"),
    ({"messages": []}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, 400, "messages must be a non-empty list"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 413, "the messages is"),
    ({"messages": CONVERSATION, "prompt": "Hi"}, 400, "unknown field 'prompt'"),
])
def test_a_bad_chat_request_is_refused_with_its_status_and_reason(server, body, status, message):
    answered, payload = post(server.url, "/v1/chat/completions", body)
    assert answered == status and message in payload["error"]["message"], payload


def test_a_ten_megabyte_body_and_unknown_routes_are_refused_and_serving_goes_on(server, client, generator):
    status, payload = post(server.url, "/v1/completions", b"{\"prompt\": \"" + b"a" * (10 << 20) + b"\"}")
    assert status == 413 and f"more than the {MAX_BODY_BYTES} this server reads" in payload["error"]["message"]
    status, payload = post(server.url, "/v1/engines", {"prompt": "Hi"})
    assert status == 404 and "POST /v1/completions" in payload["error"]["message"]
    status, payload = post(server.url, "/v1/completions", b"{}", {"Content-Length": "x"})
    assert status == 411
    reply = client.completions.create(model="nano", prompt=PROMPTS[1], max_tokens=8, **GREEDY)
    assert reply.choices[0].text == generator.generate(PROMPTS[1], max_new_tokens=8, **GREEDY)


def test_a_client_that_vanishes_mid_stream_leaves_the_server_serving(server, client, generator):
    host, port = server.url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 100, "stream": True, "ignore_eos": True}).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port))) as vanishing:
            vanishing.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                              b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            received = b""
            while b"data: " not in received:  # the first piece has come: the generation is under way
                received += vanishing.recv(4096)
    reply = client.completions.create(model="nano", prompt=PROMPTS[2], max_tokens=16, **SAMPLED)
    assert reply.choices[0].text == generator.generate(PROMPTS[2], max_new_tokens=16, **SAMPLED)


def test_a_cancelled_generation_leaves_the_batch_at_the_next_step(generator):
    batcher = Batcher(generator, max_batch=2, max_queue=0)
    try:
        staying = batcher.submit(generator.encode(PROMPTS[0]), max_new_tokens=100, ignore_eos=True, **GREEDY)
        leaving = batcher.submit(generator.encode(PROMPTS[1]), max_new_tokens=100, ignore_eos=True, **GREEDY)
        tokens = leaving.tokens()
        next(tokens), next(tokens)
        leaving.cancel()
        made = leaving.made
        assert list(staying.tokens()) == list(generator.tokens(PROMPTS[0], max_new_tokens=100, ignore_eos=True,
                                                               **GREEDY))
        assert leaving.made <= made + 1
        deadline = time.monotonic() + 5
        while batcher.taken and time.monotonic() < deadline:  # the batch thread regroups after the last step
            time.sleep(0.01)
        assert batcher.taken == 0 and not batcher.rows
    finally:
        batcher.close()


def test_503_while_the_model_loads(package):
    server = Server(ServeOptions(model=str(package), port=0, threads=1))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for path, body in [("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": []})]:
            status, payload = post(server.url, path, body)
            assert status == 503 and "the model is loading" in payload["error"]["message"]
        server.load()
        status, payload = post(server.url, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200 and payload["usage"]["completion_tokens"] <= 2
    finally:
        server.stop()


def test_bad_flags_are_one_line_errors(package, tmp_path):
    for flags, message in [(["--max-batch", "0"], "--max-batch must be ≥ 1, got 0"),
                           (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
                           (["--threads", "0"], "threads must be ≥ 1, got 0")]:
        assert_one_line_error(cli("serve", "--model", package, "--port", "0", *flags), message)
    assert_one_line_error(cli("serve", "--model", tmp_path / "missing.spj", "--port", "0"), "missing.spj")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert_one_line_error(cli("serve", "--model", package, "--port", port), f"cannot listen on 127.0.0.1:{port}")


# --- many at once ------------------------------------------------------------------------------------------------------
def test_eight_streams_at_once_join_and_leave_the_batch_and_get_their_own_text(client, generator):
    """Different prompts, lengths and samplers, all sent at once: rows of different lengths share the batch, and
    leave it at different steps."""
    requests = [dict(prompt=f"{PROMPTS[i % 4]} {i}", max_tokens=6 + 9 * i,
                     **(GREEDY if i % 2 else dict(temperature=1.0, seed=i))) for i in range(8)]
    expected = [generator.generate(r["prompt"], max_new_tokens=r["max_tokens"], ignore_eos=True,
                                   **{k: v for k, v in r.items() if k not in ("prompt", "max_tokens")})
                for r in requests]
    texts = [None] * 8
    barrier = threading.Barrier(8)

    def ask(i):
        barrier.wait()
        stream = client.completions.create(model="nano", stream=True, extra_body={"ignore_eos": True}, **requests[i])
        texts[i] = "".join(chunk.choices[0].text for chunk in stream)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert texts == expected


def test_a_hundred_requests_at_once_beyond_the_queue_get_429_and_the_rest_their_text(package, generator, tmp_path):
    running = start_server(package, tmp_path, "--max-batch", "2", "--max-queue", "8", "--api-key", KEY)
    try:
        body = {"prompt": PROMPTS[3], "max_tokens": 32, "ignore_eos": True, **SAMPLED}
        expected = generator.generate(PROMPTS[3], max_new_tokens=32, ignore_eos=True, **SAMPLED)
        answers = [None] * 100
        barrier = threading.Barrier(100)

        def ask(i):
            barrier.wait()
            answers[i] = post(running.url, "/v1/completions", body)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(100)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = [payload for status, payload in answers if status == 200]
        refused = [payload for status, payload in answers if status == 429]
        assert len(served) + len(refused) == 100 and len(served) >= 10 and refused
        assert all(p["choices"][0]["text"] == expected for p in served)
        assert all("(--max-queue 8)" in p["error"]["message"] and p["error"]["type"] == "rate_limit_error"
                   for p in refused)
        status, payload = post(running.url, "/v1/completions", body)
        assert status == 200 and payload["choices"][0]["text"] == expected
    finally:
        assert running.stop() < 2


def test_sigterm_cancels_running_streams_and_exits_0_within_2_s(package, tmp_path):
    running = start_server(package, tmp_path, "--max-batch", "2")
    client = running.client()
    streams = [client.completions.create(model="nano", prompt=p, max_tokens=100, stream=True,
                                         extra_body={"ignore_eos": True}) for p in PROMPTS[:3]]
    for stream in streams:
        next(iter(stream))
    assert running.stop() < 2
    assert "stopping" in running.log.read_text()


@pytest.mark.slow
def test_sixteen_streaming_clients_get_their_sequential_results(server, generator):
    """16 clients × 10 requests each (prompts and seeds differ, half greedy), streamed, at max batch 8: every text
    equals Generator.generate's for its prompt alone, and the server's memory is what it was after a warm-up."""
    requests = [[dict(prompt=f"{PROMPTS[(c + r) % 4]} {c}", max_tokens=8 + (c * 7 + r * 3) % 40,
                      **(GREEDY if (c + r) % 2 else dict(temperature=1.0, top_p=0.95, seed=100 * c + r)))
                 for r in range(10)] for c in range(16)]
    expected = [[generator.generate(q["prompt"], max_new_tokens=q["max_tokens"],
                                    **{k: v for k, v in q.items() if k not in ("prompt", "max_tokens")})
                 for q in client_requests] for client_requests in requests]

    def run_all() -> list[list[str]]:
        texts = [[] for _ in requests]
        errors = []

        def work(c):
            try:
                client = server.client()
                for request in requests[c]:
                    stream = client.completions.create(model="nano", stream=True, **request)
                    texts[c].append("".join(chunk.choices[0].text for chunk in stream))
            except Exception as e:  # noqa: BLE001 — every client's failure is reported, not just the first
                errors.append(repr(e))

        threads = [threading.Thread(target=work, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        return texts

    assert run_all() == expected  # the warm-up: onnxruntime's arenas grow to the batch's size
    before = server.rss_mb()
    assert run_all() == expected
    assert server.rss_mb() - before < 20
