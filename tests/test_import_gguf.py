"""`spj-edge import`: a llama.cpp GGUF → our checkpoint, against transformers' own GGUF loader (the independent
reference: its dequantization, its q/k un-permutation, its tokenizer from the same metadata).

Fast tier: a tiny 2-layer Llama written here with gguf's GGUFWriter (Q8_0, Q4_1, F16 and F32 tensors) carrying the
first 8,192 tokens of the real SmolLM2 vocabulary with the merges among them, its special tokens and chat template.
Slow tier: the real SmolLM2-135M-Instruct Q4_1 file, its whole vocabulary included.
"""
import functools
import json
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import LANGUAGES, REPO, SHARED_DATA, UD, assert_one_line_error, cli, logit_bound
from spj_edge.checkpoint import load_checkpoint
from spj_edge.import_gguf import import_gguf
from spj_edge.tokenizer import load_tokenizer
from test_document_encoder import as_lists, corpus_documents, encoded_by_tokenizers

REAL_GGUF = REPO.parent / "shared" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, context=512)
# Each tensor kind in another type, so that every dequantizer the real file needs (and F16) is exercised.
TYPES = {"token_embd": "Q8_0", "attn_q": "F16", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q4_1",
         "ffn_gate": "Q4_1", "ffn_up": "F16", "ffn_down": "Q8_0"}
# SmolLM2's 49,152 tokens cost the fixture three parses of the GGUF by gguf's reader (ours and transformers' model
# and tokenizer), 15-25 s of the fast tier; the whole vocabulary is checked against transformers in the slow tier
VOCABULARY = 8192
SMALL_VOCABULARY = 1024  # for the refusals, whose cause is elsewhere
CONVERSATION = [{"role": "user", "content": "Combien font 12 et 30 ?"}, {"role": "assistant", "content": "42."},
                {"role": "user", "content": "我们明天见？"}]


def real_texts() -> dict[str, str]:
    """About 2,000 characters of each language's held-out UD text, and the parallel PUD sentences (digits too)."""
    texts = {lang: (UD / f"{name}_test.txt").read_text(encoding="utf-8")[:2000] for lang, name in LANGUAGES.items()}
    texts["pud-zh"] = (SHARED_DATA / "parallel" / "pud" / "zh.txt").read_text(encoding="utf-8")[:2000]
    texts["digits"] = "In 2024, 12345 people paid $3.50 for 1,000,000 tokens; 第3章 2.718 -17 0x1F"
    return texts


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj and k_proj rows (its `permute`), written independently
    of the import's inverse."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


@functools.cache
def smollm2_tokenizer_metadata() -> dict:
    """The real file's tokenizer keys, read once (decoding 100 K strings takes seconds)."""
    from gguf import GGUFReader

    fields = GGUFReader(REAL_GGUF).fields
    return {key: fields[key].contents() for key in fields if key.startswith("tokenizer.")}


def write_tiny_gguf(path, architecture: str = "llama", tensor_types: dict | None = None,
                    vocabulary: int | None = None) -> dict[str, np.ndarray]:
    """A 2-layer Llama with SmolLM2's tokenizer, as llama.cpp writes one; returns q_proj of layer 0 in Hugging Face's
    row order, to check the un-permutation against. `vocabulary`: only SmolLM2's first tokens (its specials, the 256
    bytes and the first merges' results) and the merges among them, a valid BPE that reads and imports in a fraction
    of the time, for refusals whose cause is elsewhere."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    metadata = smollm2_tokenizer_metadata()
    if vocabulary is not None:
        kept = metadata["tokenizer.ggml.tokens"][:vocabulary]
        known = set(kept)
        merges = [m for m in metadata["tokenizer.ggml.merges"]
                  if (pair := m.split(" ")) and len(pair) == 2 and pair[0] in known and pair[1] in known
                  and pair[0] + pair[1] in known]
        metadata = {**metadata, "tokenizer.ggml.tokens": kept, "tokenizer.ggml.merges": merges,
                    "tokenizer.ggml.token_type": metadata["tokenizer.ggml.token_type"][:vocabulary]}
    field = metadata.__getitem__
    tokens = field("tokenizer.ggml.tokens")
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["context"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    writer.add_rope_freq_base(1e5)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(field("tokenizer.chat_template"))

    rng = np.random.default_rng(0)
    head_dim = TINY["hidden"] // TINY["heads"]
    shapes = {"token_embd": (len(tokens), TINY["hidden"]), "attn_q": (TINY["hidden"], TINY["hidden"]),
              "attn_k": (TINY["kv_heads"] * head_dim, TINY["hidden"]),
              "attn_v": (TINY["kv_heads"] * head_dim, TINY["hidden"]), "attn_output": (TINY["hidden"], TINY["hidden"]),
              "ffn_gate": (TINY["ffn"], TINY["hidden"]), "ffn_up": (TINY["ffn"], TINY["hidden"]),
              "ffn_down": (TINY["hidden"], TINY["ffn"])}
    types = {**TYPES, **(tensor_types or {})}
    hf_q = None

    def add(name: str, kind: str, weight: np.ndarray):
        qtype = GGMLQuantizationType[types.get(kind, "F32")]
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, weight.astype(np.float32))
        elif qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        elif qtype == GGMLQuantizationType.IQ4_NL:  # gguf has no quantizer for it; the import refuses it unread
            writer.add_tensor(name, np.zeros(quants.quant_shape_to_byte_shape(weight.shape, qtype), np.uint8),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(name, quants.quantize(weight.astype(np.float32), qtype), raw_dtype=qtype)

    add("token_embd.weight", "token_embd", rng.normal(0, 0.5, shapes["token_embd"]))
    for i in range(TINY["layers"]):
        add(f"blk.{i}.attn_norm.weight", "norm", rng.uniform(0.5, 1.5, TINY["hidden"]))
        add(f"blk.{i}.ffn_norm.weight", "norm", rng.uniform(0.5, 1.5, TINY["hidden"]))
        for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            weight = rng.normal(0, 0.25, shapes[kind]).astype(np.float16).astype(np.float32)  # exact in F16
            if kind == "attn_q" and i == 0:
                hf_q = weight
            if kind in ("attn_q", "attn_k"):
                weight = llama_cpp_permute(weight, TINY["heads"] if kind == "attn_q" else TINY["kv_heads"])
            add(f"blk.{i}.{kind}.weight", kind, weight)
    add("output_norm.weight", "norm", rng.uniform(0.5, 1.5, TINY["hidden"]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"q_proj": hf_q}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The tiny GGUF, its import, and transformers' model and tokenizer read from the GGUF itself."""
    directory = tmp_path_factory.mktemp("gguf")
    gguf = directory / "tiny.gguf"
    originals = write_tiny_gguf(gguf, vocabulary=VOCABULARY)
    report = import_gguf(gguf, directory / "ckpt")
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf.name)
    return directory / "ckpt", report, reference, tokenizer, originals


def test_the_checkpoint_has_hugging_face_files(imported):
    ckpt, report, _, _, _ = imported
    assert {p.name for p in ckpt.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json", "report.json"}
    config = json.loads((ckpt / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (2, 2, VOCABULARY)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 1e5
    assert report["tensor_types"] == {"F32": 5, "Q4_1": 6, "Q8_0": 5, "F16": 4}
    assert len(report["source_sha256"]) == 64 and report["import_s"] > 0
    # every end-of-generation id, as llama.cpp counts them: the eos <|im_end|>, and <|endoftext|>
    assert GenerationConfig.from_pretrained(ckpt).eos_token_id == [2, 0]
    tokenizer_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"], tokenizer_config["pad_token"],
            tokenizer_config["unk_token"], tokenizer_config["add_bos_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>", False)


def test_q_and_k_rows_are_back_in_hugging_face_order(imported):
    ckpt, _, _, _, originals = imported
    model, _ = load_checkpoint(ckpt)
    np.testing.assert_array_equal(model.layers[0].self_attn.q_proj.weight.detach().numpy(), originals["q_proj"])


def test_logits_equal_transformers_gguf_loader(imported):
    ckpt, _, reference, tokenizer, _ = imported
    model, _ = load_checkpoint(ckpt)
    ids = torch.tensor([tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False)])
    with torch.no_grad():
        ours, past = model(ids)
        theirs = reference(ids, use_cache=True)
        assert (ours - theirs.logits).abs().max() < logit_bound(theirs.logits)
        step = ours[:, -1:].argmax(-1)  # and a cached step after it
        ours, _ = model(step, past_key_values=past)
        theirs = reference(step, cache=theirs.cache, use_cache=True).logits
        assert (ours - theirs).abs().max() < logit_bound(theirs)


@pytest.mark.parametrize("name", list(real_texts()))
def test_the_tokenizer_encodes_as_transformers_does(imported, name):
    ckpt, _, _, reference, _ = imported
    from tokenizers import Tokenizer

    text = real_texts()[name]
    ours = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    expected = reference.encode(text, add_special_tokens=True)
    assert ours.encode(text).ids == expected, name
    assert AutoTokenizer.from_pretrained(ckpt).encode(text) == expected
    assert ours.decode(expected) == text


def test_documents_are_encoded_by_fastokens_with_the_ids_of_tokenizers(imported):
    """SmolLM2's pre-tokenizer, Digits then ByteLevel, as the GGUF's tokenizer becomes."""
    path = imported[0] / "tokenizer.json"
    assert [s["type"] for s in json.loads(path.read_text())["pre_tokenizer"]["pretokenizers"]] == ["Digits",
                                                                                                 "ByteLevel"]
    tokenizer, documents = load_tokenizer(path), [*corpus_documents(), *real_texts().values()]
    assert tokenizer.choose_document_encoder(documents) == "fastokens"
    assert as_lists(tokenizer.encode_documents(documents)) == encoded_by_tokenizers(tokenizer, documents)


def test_special_tokens_and_the_chat_template_render_identically(imported):
    ckpt, _, _, reference, _ = imported
    ours = AutoTokenizer.from_pretrained(ckpt)
    rendered = ours.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered == reference.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    assert ours.encode(rendered) == reference.encode(rendered)
    assert ours.encode(rendered)[0] == 1  # <|im_start|> whole, a special token
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        reference.bos_token, reference.eos_token, reference.pad_token, reference.unk_token)


def test_bfloat16_weights(imported, tmp_path):
    ckpt, _, _, _, _ = imported
    gguf = ckpt.parent / "tiny.gguf"
    result = cli("import", "--gguf", gguf, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    float32, _ = load_checkpoint(ckpt)
    bfloat16, _ = load_checkpoint(tmp_path / "bf16")
    for a, b in zip(float32.parameters(), bfloat16.parameters()):
        assert torch.equal(a.to(torch.bfloat16).float(), b)


@pytest.mark.parametrize("case", ["missing", "not-gguf", "truncated", "qwen2", "tensor-type", "exists"])
def test_bad_input_gives_one_line_and_writes_nothing(imported, tmp_path, case):
    ckpt, _, _, _, _ = imported
    gguf = tmp_path / "model.gguf"
    if case == "missing":
        fragments = ["model.gguf: no such file"]
    elif case == "not-gguf":
        gguf.write_text("First Citizen:\n")
        fragments = ["model.gguf: not a GGUF file"]
    elif case == "truncated":
        write_tiny_gguf(gguf, vocabulary=SMALL_VOCABULARY)
        data = gguf.read_bytes()
        gguf.write_bytes(data[: len(data) // 2])
        fragments = ["model.gguf: damaged or truncated GGUF file"]
    elif case == "qwen2":
        write_tiny_gguf(gguf, architecture="qwen2", vocabulary=SMALL_VOCABULARY)
        fragments = ["model.gguf: architecture 'qwen2' is not supported (supported: 'llama')"]
    elif case == "tensor-type":
        write_tiny_gguf(gguf, tensor_types={"ffn_up": "IQ4_NL"}, vocabulary=SMALL_VOCABULARY)
        fragments = ["tensor type IQ4_NL is not supported"]
    else:
        gguf = ckpt.parent / "tiny.gguf"
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "notes.txt").write_text("mine")
        fragments = ["out: already exists (pass --overwrite to replace it)"]
    assert_one_line_error(cli("import", "--gguf", gguf, "--out", tmp_path / "out"), *fragments)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    if case != "exists":
        assert not (tmp_path / "out").exists()


# --- the real model --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_real_smollm2_gguf(tmp_path):
    """SmolLM2-135M-Instruct Q4_1 (98 MB): imported (about 20 s and 1.2 GB peak on 2 cores), its logits on a chat prompt
    against transformers' GGUF loader, its export passing its own checks, 20 greedy tokens as transformers'
    generate picks them, and its whole vocabulary encoding real text as transformers' tokenizer from the file does."""
    started = time.perf_counter()
    report = import_gguf(REAL_GGUF, tmp_path / "ckpt")
    print(f"import of {REAL_GGUF.name}: {time.perf_counter() - started:.1f} s")
    assert report["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}

    reference = AutoModelForCausalLM.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name,
                                                     dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        ours = model(prompt)[0]
        theirs = reference(prompt).logits
    print(f"max |Δlogit| vs transformers: {(ours - theirs).abs().max():.2e} (bound {logit_bound(theirs):.2e})")
    assert (ours - theirs).abs().max() < logit_bound(theirs)

    from spj_edge.generate import generate_ids
    from spj_edge.sampling import Sampler, SamplingParams

    greedy = Sampler(SamplingParams(temperature=0.0), model.config.vocab_size)
    produced = list(generate_ids(model, ids, 20, greedy, eos_id=None))
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                                  eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    assert produced == expected, (tokenizer.decode(produced), tokenizer.decode(expected))

    from tokenizers import Tokenizer  # the whole vocabulary (the fast tier's GGUF has its first tokens only)

    ours = Tokenizer.from_file(str(tmp_path / "ckpt" / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name)
    for name, text in real_texts().items():
        assert ours.encode(text).ids == theirs.encode(text, add_special_tokens=True), name

    from spj_edge.export import export

    checks = export(tmp_path / "ckpt", tmp_path / "onnx")["checks"]
    print(json.dumps(checks, indent=1))
    assert checks["greedy_identical"] and checks["long_prefill_tokens"] == 256
