"""Our model against an independent implementation: transformers' LlamaForCausalLM on the same checkpoint."""
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import logit_bound
from spj_edge.checkpoint import load_checkpoint, load_model, save_checkpoint
from spj_edge.errors import SPJError
from spj_edge.generate import generate
from spj_edge.config import SPJConfig, load_preset
from spj_edge.model import Transformer, positions_from_mask
from spj_edge.sampling import SamplingParams
from spj_edge.tokenizer import TextTokenizer

GQA = SPJConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
                num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random GQA model saved as a checkpoint, and transformers' model loaded from that directory."""
    torch.manual_seed(0)
    ours = Transformer(GQA).eval()
    with torch.no_grad():  # non-trivial norm weights, so a wrong norm placement shows
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("gqa")
    save_checkpoint(path, ours, tokenizer=None)
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    return ours, hf


def test_prefill_and_cached_decode_match_transformers(pair):
    ours, hf = pair
    ids = torch.randint(0, GQA.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, past = ours(ids[:, :16])
        hf_out = hf(ids[:, :16], use_cache=True)
        assert (ours_logits - hf_out.logits).abs().max() < logit_bound(hf_out.logits)
        for t in range(16, 24):  # one token at a time through the cache
            ours_logits, past = ours(ids[:, t:t + 1], past_key_values=past)
            hf_out = hf(ids[:, t:t + 1], cache=hf_out.cache, use_cache=True)
            assert (ours_logits - hf_out.logits).abs().max() < logit_bound(hf_out.logits), f"decode step {t}"
    assert past[0][0].shape == (2, GQA.num_key_value_heads, 24, GQA.head_dim)


def test_left_padding_matches_transformers_and_the_unpadded_row(pair):
    ours, hf = pair
    ids = torch.randint(3, GQA.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 is 7 real tokens, left-padded
    ids[1, :5] = 0
    positions = positions_from_mask(mask, ids.shape[1])
    with torch.no_grad():
        ours_logits, _ = ours(ids, attention_mask=mask, position_ids=positions)
        hf_logits = hf(ids, attention_mask=mask, position_ids=positions).logits
        alone, _ = ours(ids[1:, 5:])
    assert torch.isfinite(ours_logits).all()
    assert (ours_logits[:, -7:] - hf_logits[:, -7:]).abs().max() < logit_bound(hf_logits[:, -7:])
    assert (ours_logits[1, 5:] - alone[0]).abs().max() < logit_bound(alone)


def test_checkpoint_is_hugging_face_layout(pair, tmp_path):
    ours, _ = pair
    save_checkpoint(tmp_path, ours, tokenizer=None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.layers.2.self_attn.k_proj.weight" in names and "lm_head.weight" not in names
    reloaded = load_model(tmp_path)
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[0], ours(ids)[0])


def test_greedy_generate_equals_transformers_generate(nano_checkpoint):
    """Our generate loop picks what transformers' greedy generate picks, and on the way every logit is within rounding
    of transformers' own. The two sum in different orders (and differently on AVX-512 and AVX2), so where transformers'
    top two logits are closer than that, either may win: the sequences may part there and only there."""
    model, tokenizer = load_checkpoint(nano_checkpoint)
    hf = LlamaForCausalLM.from_pretrained(nano_checkpoint).eval()
    for prompt in ("ROMEO:", "Der Hund", "我们"):
        ours = list(generate(model, tokenizer, prompt, 40, SamplingParams(temperature=0.0), ignore_eos=True))
        # framed as generate frames it (<bos> once: the tokenizer's post-processor adds it)
        framed = TextTokenizer.of(tokenizer).encode_prompt(prompt, model.config.max_position_embeddings)
        prompt_ids = torch.tensor([framed])
        out = hf.generate(prompt_ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(prompt_ids), output_logits=True, return_dict_in_generate=True)
        theirs, their_logits = out.sequences[0, prompt_ids.shape[1]:].tolist(), torch.stack(out.logits)[:, 0]
        with torch.no_grad():  # ours on transformers' sequence: each step's logits, however the picks went
            our_logits = model(out.sequences[:, :-1])[0][0, prompt_ids.shape[1] - 1:]
        bound = logit_bound(their_logits)
        assert len(ours) == 40 and (our_logits - their_logits).abs().max() <= bound, prompt
        parted = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if parted is not None:
            top_two = their_logits[parted].topk(2).values
            assert top_two[0] - top_two[1] <= 2 * bound, (prompt, parted, top_two)


def test_config_validation_and_foreign_architectures():
    with pytest.raises(SPJError, match="multiple of num_key_value_heads"):
        SPJConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(SPJError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        SPJConfig.from_hf_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    config = load_preset("teacher")
    assert SPJConfig.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(SPJError, match="no such preset.*nano"):
        load_preset("gigantic")


def test_small_preset_has_the_benchmark_shape():
    c = load_preset("small")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (512, 8, 8, 4, 1408, 32000, 1024)
    assert 35e6 < c.num_parameters() < 45e6
    assert c.num_parameters() == sum(p.numel() for p in Transformer(c).parameters())


def test_tinyllama_preset_has_tinyllamas_shape():
    """Its name has a dot, which is not a file suffix; its size is TinyLlama-1.1B's, counted by transformers on the
    meta device (no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = load_preset("tinyllama-1.1b")
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in c.to_hf_dict().items() if k != "architectures"}))
    assert c.num_parameters() == sum(p.numel() for p in hf.parameters()) == 1_100_048_384
    assert not c.tie_word_embeddings and c.head_dim == 64


@pytest.mark.parametrize("scaling", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.2's
])
def test_rope_frequencies_are_bit_for_bit_transformers(scaling):
    """The rotary table is the only thing rope scaling changes, so it must be transformers' to the last bit."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from spj_edge.model import rope_frequencies

    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=5e5,
                     max_position_embeddings=131072, rope_scaling=dict(scaling) if scaling else None)
    ours = SPJConfig.from_hf_dict({**hf.to_dict(), "architectures": ["LlamaForCausalLM"]})
    if scaling is None:
        theirs = 1.0 / 5e5 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)
    else:
        theirs, attention_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, "cpu")
        assert attention_factor == 1.0  # nothing but the frequencies changes
    assert torch.equal(rope_frequencies(ours), theirs)
    assert (ours.rope_scaling and ours.rope_scaling.to_hf_dict()) == scaling
