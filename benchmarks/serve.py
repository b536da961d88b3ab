"""`spj-edge serve` against the runtime in-process, on the `small` preset's static int8 package:

    .venv/bin/python benchmarks/serve.py [--package PKG] [--threads 1] [--new-tokens 128] [--repetitions 5]

1. single stream: decode tokens/s (first new token to last, as DESIGN.md measures decode) of one streamed request
   through the server, against Generator.generate's in this process; the two alternate, medians reported
   (target: the server ≥ 95 %);
2. aggregate tokens/s with 1, 4 and 8 concurrent streams, each stream a client thread sending requests one after the
   other (target: 4 streams ≥ 2.5× one), the time to first token's p50 and p99 at 4 streams, and the server's peak
   RSS (VmHWM) once 8 streams have run.
Random weights (speed does not depend on them), quantized with --force as benchmarks/bench_small.py does; greedy,
EOS ignored, every prompt 32 ids. Clients are raw http.client, reading the stream line by line, so that their own
work takes as little of the CPU as a client can. The figures go to stdout as JSON, with the load average.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "corpus"


def build_package(work: Path) -> Path:
    """small, random weights, static int8, packaged: once per --work directory."""
    import torch

    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.config import load_preset
    from spj_edge.data import read_texts
    from spj_edge.export import export
    from spj_edge.model import Transformer
    from spj_edge.options import QuantizeOptions
    from spj_edge.package import package
    from spj_edge.quantize import quantize
    from spj_edge.tokenizer import train_tokenizer

    target = work / "small-int8.spj"
    if target.is_dir():
        return target
    config = load_preset("small")
    tokenizer = train_tokenizer(read_texts([DATA / "ud"]).values(), min(config.vocab_size, 4096))
    torch.manual_seed(0)
    save_checkpoint(work / "ckpt", Transformer(config), tokenizer)
    export(work / "ckpt", work / "fp32", overwrite=True)
    quantize(work / "fp32", work / "int8", calib=[DATA / "ud"], overwrite=True,
             options=QuantizeOptions(mode="static", force=True, measure=False, calib_samples=16))
    package(work / "int8", target)
    return target


class Server:
    def __init__(self, package: Path, threads: int, max_batch: int):
        self.log = open(package.parent / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, "-m", "spj_edge.runtime", "serve", "--model", str(package),
                                         "--port", "0", "--threads", str(threads), "--max-batch", str(max_batch)],
                                        stderr=self.log, cwd=REPO)
        while " serves " not in (text := Path(self.log.name).read_text()):
            assert self.process.poll() is None, text
            time.sleep(0.1)
        self.host, port = text.split(" serves ")[0].split("//")[1].split("/")[0].split(":")
        self.port = int(port)

    def stream(self, prompt: str, new_tokens: int) -> list[float]:
        """One streamed completion; the times at which its request was sent and each piece of text came."""
        connection = http.client.HTTPConnection(self.host, self.port)
        body = json.dumps({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                           "stream": True})
        times = [time.perf_counter()]
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        for line in response:
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
        connection.close()
        return times[:-1]  # the last event holds the finish_reason alone

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024

    def stop(self):
        self.process.terminate()
        self.process.wait()


def prompts(generator, count: int, length: int) -> list[str]:
    """`count` different texts of exactly `length` ids each (<bos> included) as the tokenizer frames them."""
    text = (DATA / "tinyshakespeare" / "val.txt").read_text(encoding="utf-8")
    found, start = [], 0
    while len(found) < count:
        ids = generator.tokenizer.encode(text[start:start + 40 * length]).ids[:length]
        candidate = generator.tokenizer.decode(ids, skip_special_tokens=True)
        if generator.encode(candidate) == ids:
            found.append(candidate)
        start += 997
    return found


def decode_rate(times: list[float], new_tokens: int) -> float:
    """Tokens/s from the first new token to the last (a piece of text is several tokens where a character is)."""
    return (new_tokens - 1) / (times[-1] - times[1])


def in_process(generator, prompt: str, new_tokens: int) -> list[float]:
    times = [time.perf_counter()]
    for _ in generator.stream(prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True):
        times.append(time.perf_counter())
    return times


def concurrent(server: Server, texts: list[str], streams: int, per_stream: int, new_tokens: int):
    """Aggregate tokens/s of `streams` clients, each sending `per_stream` requests in turn; every time to first
    token."""
    first_token = []

    def client(i):
        for r in range(per_stream):
            times = server.stream(texts[(i * per_stream + r) % len(texts)], new_tokens)
            first_token.append(times[1] - times[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return streams * per_stream * new_tokens / (time.perf_counter() - start), first_token


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", type=Path, help="default: build small's static int8 package in --work")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-serve")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    package = args.package or build_package(args.work)

    from spj_edge.runtime import Generator

    load_before = os.getloadavg()
    generator = Generator.load(package, threads=args.threads)
    texts = prompts(generator, 16, args.prompt_tokens)
    server = Server(package, args.threads, max_batch=8)
    try:
        server.stream(texts[0], 8), in_process(generator, texts[0], 8)  # warm-up
        through_server, alone = [], []
        for r in range(args.repetitions):  # interleaved
            through_server.append(decode_rate(server.stream(texts[r], args.new_tokens), args.new_tokens))
            alone.append(decode_rate(in_process(generator, texts[r], args.new_tokens), args.new_tokens))
        aggregate, ttft = {}, {}
        for streams in (1, 4, 8):
            aggregate[streams], ttft[streams] = concurrent(server, texts, streams, 3, args.new_tokens)
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    single, reference = statistics.median(through_server), statistics.median(alone)
    at_4 = sorted(ttft[4])
    print(json.dumps({
        "package": str(package), "threads": args.threads, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "cores": os.cpu_count(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "single_stream_tokens_per_s": {"server": round(single, 1), "in_process": round(reference, 1),
                                       "server_share": round(single / reference, 3)},
        "aggregate_tokens_per_s": {str(k): round(v, 1) for k, v in aggregate.items()},
        "4_streams_over_1": round(aggregate[4] / aggregate[1], 2),
        "first_token_ms_at_4_streams": {"p50": round(1000 * statistics.median(at_4), 1),
                                        "p99": round(1000 * at_4[min(len(at_4) - 1, int(0.99 * len(at_4)))], 1),
                                        "samples": len(at_4)},
        "server_peak_rss_mb_after_8_streams": round(peak, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
