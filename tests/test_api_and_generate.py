"""The Python API, the sampler and `spj-edge generate`."""
import dataclasses

import numpy as np
import pytest

from conftest import SHAKESPEARE, cli
from spj_edge import SlimPajama
from spj_edge.errors import SPJError
from spj_edge.sampling import Sampler, SamplingParams


def test_python_api_trains_saves_loads_and_generates(tmp_path):
    model = SlimPajama("nano")
    assert repr(model).startswith("SlimPajama(125,248 parameters: 2 layers")
    with pytest.raises(SPJError, match="no tokenizer yet"):
        model("hello")
    model.train([SHAKESPEARE / "val.txt"], steps=20, batch_size=8)
    assert model.report["heldout"]["bits_per_byte"] < 6
    greedy = model("ROMEO:", max_new_tokens=12, ignore_eos=True)
    assert isinstance(greedy, str) and greedy
    path = model.save(tmp_path / "ckpt")
    again = SlimPajama.from_pretrained(path)
    assert again("ROMEO:", max_new_tokens=12, ignore_eos=True) == greedy
    assert again.config == model.config


def test_sampler_greedy_topk_seed_and_vocab_limit():
    logits = np.array([0.1, 3.0, 2.9, -1.0, 50.0])  # id 4 is past the tokenizer's vocabulary
    assert Sampler(SamplingParams(temperature=0), vocab_limit=4)(logits) == 1
    assert Sampler(SamplingParams(temperature=5.0, top_k=1, seed=3), vocab_limit=4)(logits) == 1
    draws = [Sampler(SamplingParams(temperature=2.0, seed=11), 4) for _ in range(2)]
    a = [draws[0](logits) for _ in range(50)]
    b = [draws[1](logits) for _ in range(50)]
    assert a == b and set(a) <= {0, 1, 2, 3} and len(set(a)) > 1
    nucleus = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=0), 4)
    assert {nucleus(logits) for _ in range(50)} == {1}, "top_p 0.5 keeps only the most likely of two close ids"
    penalised = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 4)
    assert penalised(logits, history=[1]) == 2


def reference_draw(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Temperature, top_k and top_p as written in the textbook: the whole vocabulary sorted, numpy's choice."""
    scores = (logits.astype(np.float64) - logits.max()) / params.temperature
    if params.top_k:
        scores[scores < np.sort(scores)[-params.top_k]] = -np.inf
    probs = np.exp(scores) / np.exp(scores).sum()
    order = np.argsort(-probs, kind="stable")
    keep = order[:int(np.searchsorted(np.cumsum(probs[order]), params.top_p)) + 1]
    kept = np.zeros_like(probs)
    kept[keep] = probs[keep]
    return int(rng.choice(len(probs), p=kept / kept.sum()))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=1.3),
                                    SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
                                    SamplingParams(temperature=1.0, top_p=0.999)])
def test_the_sampler_draws_what_a_whole_vocabulary_sort_draws(params):
    """The sampler sorts only the most likely ids for top_p; peaked and flat distributions of a real vocabulary's size,
    with ties at the top and everywhere, must give the draws of the whole sort."""
    rng = np.random.default_rng(0)
    sampler, reference = Sampler(dataclasses.replace(params, seed=5), 32000), np.random.default_rng(5)
    for t in range(60):
        logits = (rng.standard_normal(32000) * (0.3, 3.0, 12.0)[t % 3]).astype(np.float32)
        if t % 4 == 1:
            logits[rng.integers(0, 32000, 6)] = logits.max()
        if t % 4 == 2:
            logits = np.round(logits)
        assert sampler(logits) == reference_draw(logits, params, reference), t


@pytest.mark.parametrize("field, value", [("temperature", -1.0), ("top_p", 2.0), ("top_p", 0.0), ("top_k", -1),
                                          ("repetition_penalty", 0.0), ("temperature", float("nan"))])
def test_invalid_sampling_values(field, value):
    with pytest.raises(SPJError, match=field):
        SamplingParams(**{field: value})


def test_generate_cli_is_deterministic_with_a_seed_and_refuses_long_prompts(nano_checkpoint):
    args = ["generate", "--model", nano_checkpoint, "--prompt", "First Citizen:", "--max-new-tokens", "20",
            "--seed", "5", "--ignore-eos"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0 and first.stdout == second.stdout and first.stdout.strip()
    greedy = cli(*args[:-3], "--temperature", "0", "--ignore-eos")
    assert greedy.returncode == 0
    too_long = cli("generate", "--model", nano_checkpoint, "--prompt", "word " * 400)
    assert too_long.returncode == 2 and "the model's context is 128" in too_long.stderr
    bad = cli("generate", "--model", nano_checkpoint, "--prompt", "x", "--top-p", "2")
    assert bad.returncode == 2 and "top_p must be in (0, 1], got 2.0" in bad.stderr
    missing = cli("generate", "--model", nano_checkpoint.parent / "nope", "--prompt", "x")
    assert missing.returncode == 2 and "no such checkpoint directory" in missing.stderr


def test_generate_cli_takes_the_models_sampling_defaults_unless_a_flag_is_given(nano_checkpoint, tmp_path):
    """Issue 19.4: `spj-edge generate` read only its own defaults, never the model's generation_config.json."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(nano_checkpoint, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 5}))
    as_configured = cli("generate", "--model", model, "--prompt", "ROMEO:", "--ignore-eos")
    greedy = cli("generate", "--model", nano_checkpoint, "--prompt", "ROMEO:", "--ignore-eos", "--temperature",
                     "0", "--max-new-tokens", "5")
    longer = cli("generate", "--model", model, "--prompt", "ROMEO:", "--ignore-eos", "--max-new-tokens", "20")
    assert as_configured.returncode == greedy.returncode == longer.returncode == 0, as_configured.stderr[-2000:]
    assert as_configured.stdout == greedy.stdout  # greedy and 5 tokens, from the model's file alone
    assert longer.stdout.startswith(greedy.stdout.rstrip("\n")) and len(longer.stdout) > len(greedy.stdout)
