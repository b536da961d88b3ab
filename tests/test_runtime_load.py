"""The runtime under load: one loaded Generator serves 16 threads at once with the outputs of sequential runs, and
memory stays flat over 1,000 generations."""
import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from spj_edge.runtime import Generator

pytestmark = pytest.mark.slow

THREADS, PER_THREAD = 16, 25
PROMPTS = ["First Citizen:\nBefore we proceed any further, hear me speak.", "Le chat est", "我们的", "Der Hund",
           "El", ""]
# Greedy and seeded sampling, with and without EOS, through every API that runs the loop.
OPTIONS = [dict(temperature=0), dict(temperature=0, ignore_eos=True, max_new_tokens=24),
           dict(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.2, ignore_eos=True),
           dict(temperature=1.3, top_p=0.8), dict(temperature=0.7, top_k=5, max_new_tokens=8)]
APIS = ["generate", "stream", "tokens", "batch"]


@pytest.fixture(scope="module")
def generator(nano_package):
    return Generator.load(nano_package, threads=1)  # the cores go to the Python threads


def request(i: int) -> tuple:
    """The i-th of the test's requests: every prompt, option set and API meet, and each sampled one has its seed."""
    options = {"max_new_tokens": 16, **OPTIONS[i % len(OPTIONS)], "seed": i}
    return APIS[i // len(OPTIONS) % len(APIS)], PROMPTS[i % len(PROMPTS)], options


def run(generator: Generator, api: str, prompt: str, options: dict):
    if api == "generate":
        return generator.generate(prompt, **options)
    if api == "stream":
        return list(generator.stream(prompt, **options))  # the pieces too, not only their sum
    if api == "tokens":
        return list(generator.tokens(prompt, **options))
    return generator.generate_batch([prompt, prompt[::-1]], **options)


def test_16_threads_x_25_generations_give_the_sequential_outputs(generator):
    requests = [request(i) for i in range(THREADS * PER_THREAD)]
    sequential = [run(generator, *r) for r in requests]
    assert len(set(map(repr, sequential))) > len(PROMPTS) * 2, "the requests really differ"
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list:
        start.wait()  # all at once, not one after another as the pool starts them
        # thread t takes every 16th request, so the threads interleave different prompts, options and APIs
        return [(i, run(generator, *requests[i])) for i in range(t, len(requests), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        done = [pair for part in pool.map(worker, range(THREADS)) for pair in part]  # re-raises a thread's error
    assert len(done) == THREADS * PER_THREAD
    concurrent = [result for _, result in sorted(done, key=lambda pair: pair[0])]
    mismatches = [i for i, (a, b) in enumerate(zip(concurrent, sequential)) if a != b]
    assert not mismatches, f"{len(mismatches)} differ, first: request {requests[mismatches[0]]}"


def rss_bytes() -> int:
    """This process's resident set, from /proc (Linux): no psutil needed."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
def test_memory_stays_flat_over_1000_generations(generator):
    """A prompt of ~100 tokens makes anything kept per generation big enough to see: its KV cache alone is
    ~50 KiB, so keeping one per generation would grow the process by ≥ 50 MB over 1,000; the bound of 20 MB is under
    half that and far above the allocator's noise (about 1 MB measured, after the warm-up has sized its pools)."""
    prompt = PROMPTS[0] * 3
    ids = generator.encode(prompt)
    assert 90 <= len(ids) < generator.context - 4
    bound, generations = 20 * 2**20, 1000
    leaked_cache = generator.kv_bytes_per_token * len(ids)
    assert generations * leaked_cache > 2 * bound, "the bound would not catch a cache kept per generation"

    def one(i):
        api = ("generate", "stream", "tokens")[i % 3]
        return run(generator, api, prompt, dict(max_new_tokens=4, temperature=0 if i % 2 else 0.8, seed=i,
                                                ignore_eos=True))

    for i in range(200):  # warm-up: onnxruntime's arena and the allocators reach their working size
        one(i)
    gc.collect()
    before = rss_bytes()
    outputs = [one(i) for i in range(generations)]
    gc.collect()
    growth = rss_bytes() - before
    print(f"RSS {before / 2**20:.1f} MiB, growth over {generations} generations {growth / 2**20:+.2f} MiB")
    greedy_streams = outputs[1::6]  # i % 6 == 1: stream, greedy
    assert len(greedy_streams) > 100 and all(out == greedy_streams[0] for out in greedy_streams)
    assert growth < bound, f"RSS grew {growth / 2**20:.1f} MiB over {generations} generations"
