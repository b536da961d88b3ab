"""Training tokens/s of our model vs transformers.LlamaForCausalLM on the same config, batch and precision.

    .venv/bin/python benchmarks/train_throughput.py --preset teacher --batch-size 16 --precision bf16 [--compile]

Each repetition runs forward + backward + AdamW step; repetitions alternate between the two models and the median is
reported, so that a slow moment of the machine hits both.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from spj_edge.config import load_preset
from spj_edge.model import Transformer
from spj_edge.train import autocast_dtype, lm_loss


def hf_loss(model, inputs, targets):
    logits = model(input_ids=inputs, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="teacher")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per repetition")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (as `spj-edge train --compile`)")
    args = ap.parse_args()

    config = load_preset(args.preset)
    torch.manual_seed(0)
    ours = Transformer(config)
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "architectures"}))
    hf.load_state_dict({f"model.{k}": v for k, v in ours.state_dict().items()}, strict=False)
    amp = autocast_dtype(args.precision, torch.device("cpu"))
    seq = config.max_position_embeddings
    batch = torch.randint(0, config.vocab_size, (args.batch_size, seq + 1))
    if args.compile:
        ours, hf = torch.compile(ours), torch.compile(hf)
    contenders = {"spj-edge": (ours, lm_loss), "transformers": (hf, hf_loss)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, (m, _) in contenders.items()}

    def run(name: str, steps: int) -> float:
        model, loss_fn = contenders[name]
        model.train()
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
                loss = loss_fn(model, batch[:, :-1], batch[:, 1:])
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return args.batch_size * seq * steps / (time.perf_counter() - start)

    for name in contenders:  # warm-up: allocator, oneDNN kernel selection
        run(name, 2)
    rates = {name: [] for name in contenders}
    for _ in range(args.repetitions):
        for name in contenders:
            rates[name].append(run(name, args.steps))
    result = {name: {"median_tokens_per_s": statistics.median(r), "min": min(r), "max": max(r)}
              for name, r in rates.items()}
    result["speedup"] = result["spj-edge"]["median_tokens_per_s"] / result["transformers"]["median_tokens_per_s"]
    result.update(preset=args.preset, batch_size=args.batch_size, seq=seq, precision=str(amp or "float32"), compile=args.compile,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
