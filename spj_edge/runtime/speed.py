"""Speed as a user sees it: the prompt's time to the first new token, decode tokens/s after it, and a new process's
time to its first token. Used by `--verbose`, benchmarks/runtime_speed.py and the Raspberry Pi check."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence


@dataclass
class Timing:
    prompt_tokens: int
    start: float = field(default_factory=time.perf_counter)
    times: list[float] = field(default_factory=list)  # when each new token arrived

    def track(self, tokens: Iterable[int]) -> Iterator[int]:
        for token in tokens:
            self.times.append(time.perf_counter())
            yield token

    @property
    def prompt_ms(self) -> float:
        """From the request to the first new token: encoding, the prompt's forward step and one sampling."""
        return (self.times[0] - self.start) * 1000 if self.times else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: the steps after the first new token, each one a single-token forward step."""
        return (len(self.times) - 1) / (self.times[-1] - self.times[0]) if len(self.times) > 1 else float("nan")

    def summary(self) -> str:
        return (f"prompt {self.prompt_tokens} tokens: first new token after {self.prompt_ms:.1f} ms; "
                f"{len(self.times)} new tokens at {self.tokens_per_s:.1f} tokens/s")


def measure(generator, prompt: str | Sequence[int], new_tokens: int) -> Timing:
    """One greedy generation of exactly `new_tokens` tokens (EOS ignored)."""
    timing = Timing(len(generator.encode(prompt)))
    for _ in timing.track(generator.tokens(prompt, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)):
        pass
    return timing


def first_token_s(package: str | os.PathLike, prompt: str, threads: int | None = None,
                  python: str = sys.executable) -> float:
    """Seconds from starting `python -m spj_edge.runtime` to its first byte of output: interpreter start, imports,
    hash checks, session creation, the prompt and one token."""
    command = [python, "-m", "spj_edge.runtime", "--model", str(package), "--prompt", prompt, "--max-new-tokens", "1",
               "--temperature", "0", "--ignore-eos", *(["--threads", str(threads)] if threads else [])]
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        first = process.stdout.read(1)
        elapsed = time.perf_counter() - start
        _, stderr = process.communicate()
    if process.returncode or not first:
        raise RuntimeError(f"{' '.join(command)} failed: {stderr.decode(errors='replace')[-500:]}")
    return elapsed
