"""Documents encoded by fastokens: exactly the ids `tokenizers` gives (encode_documents as it was: the post-processor's
frame, the first EOS id, a special token's text kept as text), for our tokenizer on real text in five languages and
for variants of it; tokenizers fastokens refuses stay on `tokenizers`, and so does one whose regex the two engines read
differently, caught by the comparison on the first documents. SmolLM2's tokenizer: test_specials_and_chat and
test_import_gguf."""
import json
import pickle
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from conftest import SHAKESPEARE, UD
from spj_edge.data import split_documents
from spj_edge.document_encoder import FastEncoder
from spj_edge.options import PrepareOptions
from spj_edge.prepare import prepare
from spj_edge.tokenizer import TextTokenizer, load_tokenizer, save_tokenizer, train_tokenizer

# Text whose framing or splitting is easy to get wrong: nothing, whitespace alone, long runs of it, special tokens'
# text inside a document (text, not their ids), characters from beyond the Basic Multilingual Plane.
EDGE_DOCUMENTS = ["", " ", "\n", "\n" * 60, " " * 1000, "a" + " " * 100 + "\n" * 30 + "\t b  \r\n", "ends in spaces   ",
                  "<|eos|>", "before <|eos|> after<|bos|><|pad|>", "<|im_end|> and <|endoftext|>",
                  "x<|eos|>\n\n<|eos|>",
                  "12 345 6789 ١٢٣ ½", "it's we'll THEY'RE", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🧪\U0004abcd", "\x00\x04\x1d\x7f control"]


def corpus_documents() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(UD.glob("*.txt"))]
    texts.append((SHAKESPEARE / "val.txt").read_text(encoding="utf-8"))
    return [d for t in texts for d in split_documents(t)] + EDGE_DOCUMENTS


def encoded_by_tokenizers(tokenizer: TextTokenizer, documents: list[str]) -> list[list[int]]:
    """What encode_documents gave before fastokens, one list a document."""
    return [[*e.ids, *tokenizer.special.eos[:1]] for e in tokenizer.backend.encode_batch_fast(documents)]


def as_lists(encoded: tuple[np.ndarray, np.ndarray]) -> list[list[int]]:
    """encode_documents' ids end to end and lengths, one list a document."""
    ids, lengths = encoded
    assert ids.dtype == np.uint32 and len(ids) == lengths.sum()
    return [d.tolist() for d in np.split(ids, np.cumsum(lengths)[:-1])]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    path = tmp_path_factory.mktemp("ours") / "tokenizer.json"
    save_tokenizer(train_tokenizer([p.read_text(encoding="utf-8") for p in sorted(UD.glob("*_dev.txt"))], 2048), path)
    return path


def with_spec(path, change) -> TextTokenizer:
    """The tokenizer at `path` with `change` made to its tokenizer.json."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    change(spec)
    return TextTokenizer.of(Tokenizer.from_str(json.dumps(spec)))


def test_fastokens_gives_the_ids_tokenizers_gives(ours):
    tokenizer, documents = load_tokenizer(ours), corpus_documents()
    assert tokenizer.choose_document_encoder(documents) == "fastokens"
    encoded = as_lists(tokenizer.encode_documents(documents))
    assert encoded == encoded_by_tokenizers(tokenizer, documents)
    bos, eos = tokenizer.special.bos, tokenizer.special.eos[0]
    assert encoded[-len(EDGE_DOCUMENTS)] == [bos, eos]  # the empty document
    assert all(d[0] == bos and d[-1] == eos and eos not in d[1:-1] and bos not in d[1:] for d in encoded)


def test_the_first_call_chooses_the_encoder_and_a_copy_keeps_it(ours):
    tokenizer = load_tokenizer(ours)
    assert tokenizer.document_encoder is None
    ids, lengths = tokenizer.encode_documents(["Some text."])
    assert tokenizer.document_encoder == "fastokens"
    copy = pickle.loads(pickle.dumps(tokenizer))  # fastokens' own tokenizer does not pickle: the copy makes one
    assert copy.document_encoder == "fastokens" and isinstance(copy._fast, FastEncoder)
    again = copy.encode_documents(["Some text."])
    assert again[0].tolist() == ids.tolist() and again[1].tolist() == lengths.tolist()


def test_a_template_with_ids_after_the_text(ours):
    backend = Tokenizer.from_file(str(ours))
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(), processors.TemplateProcessing(single="<|pad|> <|bos|> $A <|eos|>", special_tokens=[
            ("<|pad|>", 0), ("<|bos|>", 1), ("<|eos|>", 2)])])
    tokenizer, documents = TextTokenizer.of(backend), corpus_documents()[::10]
    assert tokenizer.choose_document_encoder(documents) == "fastokens"
    encoded = as_lists(tokenizer.encode_documents(documents))
    assert encoded == encoded_by_tokenizers(tokenizer, documents)
    assert all(d[:2] == [0, 1] and d[-2:] == [2, 2] for d in encoded)


@pytest.mark.parametrize("change", [
    lambda spec: spec.update(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True}),
    lambda spec: spec.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [  # SmolLM2's, run as one regex
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}),
    lambda spec: spec["model"]["merges"].insert(5, spec["model"]["merges"].pop(40)),  # a merge out of id order
    lambda spec: spec["model"].update(ignore_merges=True),
    lambda spec: spec["added_tokens"].append({**spec["added_tokens"][0], "id": 2048, "content": "plain",
                                              "special": False}),  # split out of the text as its id
], ids=["prefix space", "digits one by one", "merges out of order", "ignore_merges", "added token not special"])
def test_fastokens_reproduces_variants_of_the_tokenizer(ours, change):
    tokenizer, documents = with_spec(ours, change), [*corpus_documents()[::20], "a plain text"]
    assert tokenizer.choose_document_encoder(documents) == "fastokens"
    assert as_lists(tokenizer.encode_documents(documents)) == encoded_by_tokenizers(tokenizer, documents)


def wordpiece() -> TextTokenizer:
    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "cat": 2, "##s": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer.of(backend)


def test_a_tokenizer_fastokens_refuses_stays_on_tokenizers(ours):
    nfkc = with_spec(ours, lambda spec: spec.update(normalizer={"type": "NFKC"}))
    assert FastEncoder.of(nfkc.backend) is None
    documents = corpus_documents()[::50]
    assert as_lists(nfkc.encode_documents(documents)) == encoded_by_tokenizers(nfkc, documents)
    assert nfkc.document_encoder == "tokenizers"
    tokenizer = wordpiece()
    assert FastEncoder.of(tokenizer.backend) is None
    assert as_lists(tokenizer.encode_documents(["the cats", "dog"])) == [[1, 2, 3], [0]]
    assert tokenizer.document_encoder == "tokenizers"


def test_without_fastokens_installed_documents_go_to_tokenizers(ours, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastokens", None)  # what an install without its wheel (Linux on ARM) has
    tokenizer, documents = load_tokenizer(ours), corpus_documents()[::50]
    assert tokenizer.choose_document_encoder(documents) == "tokenizers"
    assert as_lists(tokenizer.encode_documents(documents)) == encoded_by_tokenizers(tokenizer, documents)


def line_end_split(spec):
    """A Split regex Oniguruma and PCRE2 read differently: Oniguruma's `$` matches before every newline, PCRE2's at
    the end of the text only."""
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\w+$|\s+|\w|[^\w\s]+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_a_difference_found_on_the_first_documents_keeps_tokenizers(ours, capsys):
    tokenizer, documents = with_spec(ours, line_end_split), corpus_documents()[::20]  # Oniguruma is slow on it
    fast = FastEncoder.of(tokenizer.backend)  # it takes it, and differs
    ids, offsets = fast.encode(documents[:20])
    assert [d.tolist() for d in np.split(ids, offsets[1:-1])] \
        != [e.ids for e in tokenizer.backend.encode_batch_fast(documents[:20])]
    encoded = as_lists(tokenizer.encode_documents(documents))
    assert tokenizer.document_encoder == "tokenizers"
    assert encoded == encoded_by_tokenizers(tokenizer, documents)
    assert capsys.readouterr().err.count("fastokens' ids differ from tokenizers'") == 1
    tokenizer.encode_documents(documents[:5])
    assert capsys.readouterr().err == "", "said once"


@pytest.mark.parametrize("split, encoder", [(None, "fastokens"), (line_end_split, "tokenizers")])
def test_prepare_reports_its_encoder_and_writes_the_ids_of_tokenizers(ours, tmp_path, split, encoder):
    path = ours
    if split is not None:
        path = tmp_path / "tokenizer.json"
        save_tokenizer(with_spec(ours, split), path)
    report = prepare([UD / "en_ewt_test.txt"], path, tmp_path / "out", PrepareOptions(workers=1, val_fraction=0.0))
    assert report["encoder"] == encoder
    documents = split_documents((UD / "en_ewt_test.txt").read_text(encoding="utf-8"))
    expected = [i for d in encoded_by_tokenizers(load_tokenizer(path), documents) for i in d]
    (shard,) = report["sources"]["en_ewt_test.txt"]["train"]["shards"]
    assert np.fromfile(tmp_path / "out" / shard["name"], dtype=np.uint16).tolist() == expected
