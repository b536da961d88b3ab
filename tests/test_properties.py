"""Property tests (hypothesis): the tokenizer round-trips any Unicode text, the sampler returns a valid id for any
valid parameters and any logits, and the runtime answers any prompt string with text or an SPJError.

Every test runs a fixed number of examples chosen by a fixed seed (derandomize), so CI sees the same cases each run;
the counts are sized for about 30 s in all on one core."""
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from conftest import LANGUAGES, SHAKESPEARE, UD
from spj_edge.errors import SPJError
from spj_edge.runtime import Generator
from spj_edge.sampling import Sampler, SamplingParams

pytestmark = pytest.mark.slow
from spj_edge.tokenizer import SPECIAL_TOKENS, special_token_ids, train_tokenizer


def fixed(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# Characters a tokenizer is likely to get wrong, mixed into the arbitrary text: NUL and control characters, CR/LF,
# combining marks, emoji with modifiers and joiners, CJK, the byte-level alphabet's own stand-ins (Ġ, Ċ), a BOM,
# and the special tokens' text.
ODD = ["\x00", "\x7f", "\r\n", "\n", "\t", " ", "e\u0301", "\u0301\u0308", "😀", "👩🏽‍💻", "🇫🇷", "中文", "𠀀", "Ġ",
       "Ċ", "\ufeff", "\u200b", "\U0010ffff", *SPECIAL_TOKENS, "<|", "|>"]
ANY_TEXT = st.one_of(st.text(), st.lists(st.one_of(st.sampled_from(ODD), st.text(max_size=3))).map("".join))


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained on real text in five languages, Chinese included."""
    texts = [(SHAKESPEARE / "val.txt").read_text(encoding="utf-8")[:100_000],
             *((UD / f"{name}_dev.txt").read_text(encoding="utf-8")[:50_000] for name in LANGUAGES.values())]
    return train_tokenizer(texts, 1024)


@fixed(3000)
@given(text=ANY_TEXT)
@example(text="")
@example(text="<|bos|>Hi<|eos|><|pad|>")
def test_tokenizer_round_trips_any_unicode_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    # the prompt path: <bos> in front (the tokenizer's post-processor), and the special tokens' text stays text (never
    # a control id)
    bos = special_token_ids(tokenizer)["bos_token_id"]
    prompt = tokenizer.encode_prompt(text, 10**9)
    assert prompt[0] == bos and not set(prompt[1:]) & set(special_token_ids(tokenizer).values())
    assert tokenizer.decode(prompt[1:]) == text


# Logits as a model might give them and worse: float32 or float64, ties, the largest and smallest values, ±inf, NaN.
def extreme(dtype) -> st.SearchStrategy:
    big, tiny = float(np.finfo(dtype).max), float(np.finfo(dtype).smallest_subnormal)
    return st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e30, -1e30, big, -big, tiny, np.inf, -np.inf, np.nan])


def logits(dtype, width: int) -> st.SearchStrategy:
    return st.one_of(
        arrays(dtype, st.integers(1, 48), elements=st.one_of(st.floats(width=width), extreme(dtype))),
        st.builds(np.full, st.integers(1, 48), extreme(dtype), st.just(dtype)))  # all tied


LOGITS = st.one_of(logits(np.float64, 64), logits(np.float32, 32))


def sampling_params(temperature: st.SearchStrategy) -> st.SearchStrategy:
    return st.builds(
        SamplingParams, temperature=temperature, top_k=st.integers(0, 64),
        top_p=st.one_of(st.floats(0, 1, exclude_min=True), st.sampled_from([5e-324, 1.0])),
        repetition_penalty=st.one_of(st.floats(0, 1e308, exclude_min=True), st.sampled_from([5e-324, 1.0, 1e308])),
        seed=st.one_of(st.none(), st.integers(0, 2**128)))


SAMPLING = st.one_of(st.floats(0, 1e308, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1e300]))


@fixed(3000)
@given(params=sampling_params(st.one_of(st.just(0.0), SAMPLING)), logits=LOGITS, vocab_limit=st.integers(1, 64),
       history=st.lists(st.integers(-64, 128)))
def test_the_sampler_always_returns_a_valid_id(params, logits, vocab_limit, history):
    sampler = Sampler(params, vocab_limit)
    for _ in range(3):  # the generator's state moves on: later draws too
        token = sampler(logits, history)
        assert type(token) is int and 0 <= token < min(vocab_limit, len(logits))


@fixed(1000)
@given(params=sampling_params(SAMPLING), logits=LOGITS, data=st.data())
def test_an_infinite_or_only_possible_score_is_always_the_one_drawn(params, logits, data):
    """Where one id is +inf, or every other id is -inf/NaN, sampling (no repetition penalty) has one choice."""
    chosen = data.draw(st.integers(0, len(logits) - 1))
    logits = logits.copy()
    if data.draw(st.booleans()):
        logits[np.isposinf(logits)] = 0
        logits[chosen] = np.inf
    else:
        logits[:] = data.draw(st.sampled_from([-np.inf, np.nan]))
        big = float(np.finfo(logits.dtype).max)
        logits[chosen] = data.draw(st.floats(-big, big, width=np.finfo(logits.dtype).bits))
    sampler = Sampler(SamplingParams(params.temperature, params.top_k, params.top_p, seed=params.seed), len(logits))
    assert sampler(logits) == chosen


@pytest.mark.parametrize("bad, message", [(dict(seed=-1), "seed must be an integer ≥ 0, got -1"),
                                          (dict(seed=1.5), "seed must be an integer ≥ 0, got 1.5")])
def test_a_bad_seed_is_an_spj_error(bad, message):
    with pytest.raises(SPJError, match=message):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def generator(nano_package):
    return Generator.load(nano_package, threads=1)


# Any str, lone surrogates included (what stdin decoded with surrogateescape gives); long enough that some fill the
# context of 128 tokens.
PROMPTS = st.one_of(st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=400),
                    st.lists(st.sampled_from(ODD + ["\ud800", "\udfff"]), max_size=150).map("".join))


@fixed(1000)
@given(prompt=PROMPTS, max_new_tokens=st.integers(0, 4), temperature=st.sampled_from([0.0, 0.7, 50.0]),
       seed=st.integers(0, 2**32), api=st.sampled_from(["generate", "stream", "tokens", "batch"]))
@example(prompt="", max_new_tokens=4, temperature=0.0, seed=0, api="generate")
@example(prompt="<|eos|>" * 60, max_new_tokens=4, temperature=0.0, seed=0, api="generate")
def test_the_runtime_answers_any_prompt_with_text_or_an_spj_error(generator, prompt, max_new_tokens, temperature,
                                                                   seed, api):
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, ignore_eos=True)
    try:
        if api == "generate":
            result = generator.generate(prompt, **options)
        elif api == "stream":
            result = "".join(generator.stream(prompt, **options))
        elif api == "tokens":
            result = generator.tokenizer.decode(list(generator.tokens(prompt, **options)))
        else:
            (result,) = generator.generate_batch([prompt], **options)
    except SPJError as e:
        # only two reasons to refuse a str: it has no UTF-8 form, or it leaves no room to generate
        if any(0xD800 <= ord(c) <= 0xDFFF for c in prompt):
            assert "prompt is not valid Unicode text" in str(e)
        else:
            assert len(generator.tokenizer.encode(prompt, add_special_tokens=False).ids) + 1 >= generator.context
            assert "leaves no room to generate" in str(e)
        return
    assert isinstance(result, str)
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in prompt), "a prompt with no UTF-8 form was accepted"
    if max_new_tokens == 0:
        assert result == ""
