"""Tokenizer round trips and the data pipeline, on the real text of ../shared/data."""
import copy
import json

import numpy as np
import pytest

from conftest import LANGUAGES, UD, cli
from spj_edge.data import WindowOrder, build_dataset, read_texts, split_documents, tokenize_corpus
from spj_edge.errors import SPJError
from spj_edge.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids, token_byte_lengths, train_tokenizer


@pytest.fixture(scope="module")
def ud_tokenizer():
    return train_tokenizer(read_texts([UD / f"{n}_dev.txt" for n in LANGUAGES.values()]).values(), 1024)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_round_trip_of_each_language_on_unseen_text(ud_tokenizer, lang):
    text = (UD / f"{LANGUAGES[lang]}_test.txt").read_text(encoding="utf-8")
    ids = ud_tokenizer.encode(text, add_special_tokens=False).ids
    assert ud_tokenizer.decode(ids, skip_special_tokens=False) == text
    assert len(ids) < len(text.encode("utf-8")) / 1.5, "BPE should compress the text"
    # byte accounting used for bits per byte: the ids' byte lengths add up to the text's UTF-8 size
    assert token_byte_lengths(ud_tokenizer, 1024)[ids].sum() == len(text.encode("utf-8"))


def test_odd_text_round_trips(ud_tokenizer):
    for text in ("", " leading space", "tabs\tand\r\nCRLF", "emoji 🦙🦙 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "literal <|eos|> marker",
                 "\u200bzero width", "مرحبا", "ＦＵＬＬ ｗｉｄｔｈ"):
        assert ud_tokenizer.decode(ud_tokenizer.encode(text, add_special_tokens=False).ids,
                                   skip_special_tokens=False) == text


def test_special_tokens_come_first(ud_tokenizer):
    assert [ud_tokenizer.id_to_token(i) for i in range(3)] == list(SPECIAL_TOKENS)
    assert special_token_ids(ud_tokenizer) == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def test_our_bos_comes_from_the_tokenizer_and_old_tokenizer_files_keep_it(ud_tokenizer, tmp_path):
    """Our presets' <|bos|> is put in front by tokenizer.json's own post-processor, so any reader of the file (the
    runtime, transformers) frames a prompt as training did; a tokenizer.json saved before it had one gets it too."""
    text = "literal <|eos|> marker"
    assert ud_tokenizer.encode(text).ids == [1, *ud_tokenizer.encode(text, add_special_tokens=False).ids]
    assert ud_tokenizer.encode_prompt(text, 100) == ud_tokenizer.encode(text).ids
    assert 2 not in ud_tokenizer.encode_prompt(text, 100), "the text <|eos|> stays text"
    spec = json.loads(ud_tokenizer.to_str())
    assert spec["post_processor"]["type"] == "TemplateProcessing"
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    old = load_tokenizer(tmp_path / "tokenizer.json")
    assert old.encode_prompt(text, 100) == ud_tokenizer.encode_prompt(text, 100)
    assert (old.special.bos, old.eos_ids, old.special.pad, old.special.adds_bos) == (1, (2,), 0, True)
    assert copy.deepcopy(old).encode_prompt(text, 100) == old.encode_prompt(text, 100), "a copy keeps the guard"


def test_tokenizer_cli_reports_bytes_per_token(tmp_path):
    out = tmp_path / "tok.json"
    result = cli("tokenizer", "--data", UD / "fr_gsd_dev.txt", UD / "zh_gsdsimp_dev.txt",
                     "--vocab-size", 600, "--out", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.with_suffix(".report.json").read_text())
    per_file = {k.rsplit("/", 1)[-1]: v for k, v in report["files"].items()}
    assert set(per_file) == {"fr_gsd_dev.txt", "zh_gsdsimp_dev.txt"}
    for stats in per_file.values():
        assert stats["bytes_per_token"] == pytest.approx(stats["bytes"] / stats["tokens"]) and stats["bytes_per_token"] > 1
    assert "fr_gsd_dev.txt" in result.stderr


def test_documents_concatenate_back_to_the_text():
    text = "para one\nline\n\n\npara two\n\nlast"
    docs = split_documents(text)
    assert "".join(docs) == text and len(docs) == 3


def test_split_is_deterministic_by_seed_and_disjoint():
    stream = np.arange(10_000)
    a, b, c = (build_dataset(stream, 31, seed, 0.1) for seed in (1, 1, 2))
    assert np.array_equal(a.val, b.val) and a.fingerprint == b.fingerprint
    assert not np.array_equal(a.val, c.val)
    assert len(a.val) == round(len(stream) // 32 * 0.1)
    first = a.train_batch(1, 0, a.train_windows)
    assert a.train_windows + len(a.val) == len(stream) // 32
    assert not set(a.val[:, 0]) & set(first[:, 0])
    # every window is a contiguous run of the stream: targets are the inputs shifted by one
    assert (np.diff(first, axis=1) == 1).all() and (first[:, 0] % 32 == 0).all()
    assert len(set(first[:, 0])) == a.train_windows, "an epoch visits every training window once"
    assert np.array_equal(a.train_batch(1, 5, 3), first[5:8])
    second = a.train_batch(1, a.train_windows, a.train_windows)
    assert set(second[:, 0]) == set(first[:, 0]) and not np.array_equal(second, first), "the next epoch reshuffles"


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 17, 64, 1000, 4097])
def test_a_window_order_is_a_permutation_that_the_key_changes(n):
    order = [WindowOrder(n, (7, 0, 0))[i] for i in range(n)]
    assert sorted(order) == list(range(n))
    if n >= 17:
        assert order != [WindowOrder(n, (7, 0, 1))[i] for i in range(n)] and order != sorted(order)
        assert abs(np.corrcoef(np.arange(n), order)[0, 1]) < 0.5  # shuffled, not shifted


def test_a_window_order_needs_no_memory_for_the_windows():
    """A trillion windows (a stored int64 permutation: 8 TB): each place computed when asked, all distinct."""
    order = WindowOrder(10 ** 12, (1, 2, 3))
    places = [order[i] for i in range(2000)]
    assert len(set(places)) == 2000 and all(0 <= p < 10 ** 12 for p in places) and max(places) > 10 ** 11


def test_corpus_stream_frames_paragraphs(ud_tokenizer):
    stream = tokenize_corpus(["a b\n\nc d"], ud_tokenizer)
    assert (stream == 1).sum() == 2 and (stream == 2).sum() == 2 and stream[0] == 1 and stream[-1] == 2


def test_bad_text_is_refused_with_the_file_named(tmp_path):
    (tmp_path / "good.txt").write_text("hello", encoding="utf-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(SPJError, match=r"latin1\.txt: not UTF-8 text \(invalid byte at offset 3\)"):
        read_texts([tmp_path])
    bad.write_bytes(b"\x00\x01binary")
    with pytest.raises(SPJError, match=r"latin1\.txt: binary file"):
        read_texts([tmp_path])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SPJError, match="directory has no files"):
        read_texts([empty])
    (empty / "blank.txt").write_text("  \n")
    with pytest.raises(SPJError, match="no text found"):
        read_texts([empty])
    with pytest.raises(SPJError, match="missing.txt: no such file"):
        read_texts([tmp_path / "missing.txt"])
