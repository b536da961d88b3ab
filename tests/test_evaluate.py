"""`spj-edge eval`: its figures against an independent computation, every kind of model alike, the metrics on known
pairs, no network, and bad input."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import REPO, SHAKESPEARE, SHARED_DATA, UD, assert_one_line_error, cli, run_cli
from spj_edge import evaluate as ev
from spj_edge.checkpoint import load_checkpoint
from spj_edge.data import tokenize_corpus
from spj_edge.options import EvalOptions

NLTK_DATA = SHARED_DATA / "nltk_data"


@pytest.fixture(scope="module")
def ascii_text(tmp_path_factory):
    """Plain ASCII, so that the bytes a token stands for are the bytes its decoded text has."""
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text(SHAKESPEARE.joinpath("val.txt").read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def kinds(nano_checkpoint, nano_export, nano_package):
    """The session's nano as a checkpoint, an export and a package (conftest)."""
    return {"checkpoint": nano_checkpoint, "onnx": nano_export, "package": nano_package}


def test_bits_per_byte_is_summed_nll_over_bytes_computed_by_transformers(nano_checkpoint, ascii_text):
    report = ev.evaluate(nano_checkpoint, [ascii_text], options=EvalOptions(windows=10**6, prompts=0))
    figures = report["files"][str(ascii_text)]

    # Independently: transformers' Llama on every non-overlapping 128-token window of the same token stream, the
    # targets that stand for text (not <bos> or <eos>) scored, and the bytes counted from the decoded targets.
    _, tokenizer = load_checkpoint(nano_checkpoint)
    hf = LlamaForCausalLM.from_pretrained(nano_checkpoint).eval()
    stream = tokenize_corpus([ascii_text.read_text()], tokenizer)
    windows = torch.from_numpy(stream[:len(stream) // 128 * 128].reshape(-1, 128))
    with torch.no_grad():
        logits = hf(windows).logits[:, :-1].double()
    targets = windows[:, 1:]
    text = ~torch.isin(targets, torch.tensor(list(tokenizer.get_added_tokens_decoder())))
    nll = -torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0][text].sum().item()
    n_bytes = sum(len(tokenizer.decode(row.tolist(), skip_special_tokens=True).encode()) for row in targets)

    assert figures["tokens"] == int(text.sum()) < targets.numel() and figures["bytes"] == n_bytes
    assert figures["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(nll / int(text.sum())), rel=1e-5)
    assert figures["prompts"] == 0 and figures["vs_reference"]["bleu"] is None


def test_checkpoint_export_and_package_give_the_same_figures(kinds):
    texts = {p: p.read_text(encoding="utf-8") for p in (UD / "en_ewt_test.txt", UD / "zh_gsdsimp_test.txt")}
    settings = EvalOptions(windows=4, prompts=4, new_tokens=12)
    results = {kind: ev.run(ev.scorer(path), texts, settings) for kind, path in kinds.items()}
    reference = results["checkpoint"]
    for kind in ("onnx", "package"):  # the package is scored token by token through the runtime's KV cache
        for path, r in results[kind].items():
            assert r.figures.bits_per_byte == pytest.approx(reference[path].figures.bits_per_byte, rel=1e-4), kind
            assert (r.figures.top1 == reference[path].figures.top1).mean() >= 0.99, kind
            assert r.continuations == reference[path].continuations, kind
    report = ev.build_report({"path": "package"}, results["package"], settings, False, {"path": "checkpoint"},
                             reference)
    assert set(report["languages"]) == {"en", "zh"}
    assert report["all"]["top1_agreement"] >= 0.99 and report["all"]["prompts"] == 8
    # identical continuations: ROUGE-L 1 for each that has a word, 0 for one that has none
    continuations = [c for r in reference.values() for c in r.continuations]
    worded = np.mean([bool(ev.UnicodeTokenizer().tokenize(c)) for c in continuations])
    assert report["all"]["vs_baseline"]["rougeL"] == pytest.approx(worded)


def test_metrics_on_known_pairs():
    assert ev.wordnet_available() or pytest.fail(f"no WordNet under {NLTK_DATA}")
    same = ["The cat sat on the mat near the door.", "Le président de la République a parlé à l'école."]
    perfect = ev.text_metrics(same, same, "en", meteor=True)
    assert perfect["bleu"] == pytest.approx(100) and perfect["rouge1"] == perfect["rougeL"] == pytest.approx(1)
    assert perfect["meteor"] == pytest.approx(1, abs=2e-3)
    chinese = ["中国的首都是北京。"]
    assert ev.text_metrics(chinese, chinese, "zh", meteor=True)["bleu"] == pytest.approx(100)
    assert ev.text_metrics(chinese, chinese, "zh", meteor=True)["rouge2"] == pytest.approx(1)

    unrelated = ev.text_metrics(["alpha beta gamma delta"], ["one two three four"], "en", meteor=True)
    assert all(unrelated[k] == 0 for k in ev.METRICS)
    # rouge by hand: unigrams a b shared of 4 and 4 → F1 0.5; bigrams "a b" shared of 3 and 3 → 1/3
    half = ev.text_metrics(["a b c d"], ["a b e f"], "en", meteor=False)
    assert half["rouge1"] == pytest.approx(0.5) and half["rouge2"] == pytest.approx(1 / 3)
    assert half["meteor"] is None


def test_unicode_tokenizer_keeps_accents_and_splits_chinese_by_character():
    tokenize = ev.UnicodeTokenizer().tokenize
    assert tokenize("Élève à l'école, Straße!") == ["élève", "à", "l", "école", "straße"]
    assert tokenize("中国的city 2024") == ["中", "国", "的", "city", "2024"]


def test_prompts_split_lines_in_half_by_words_or_by_characters():
    pairs = ev.prompt_pairs("one two three four five six\nshort line\n一二三四五六七八九十一二\n", 10)
    assert pairs == [("one two three", "four five six"), ("一二三四五六", "七八九十一二")]
    assert ev.language_of(UD / "fr_gsd_test.txt") == "fr" and ev.language_of(SHAKESPEARE / "val.txt") is None


def test_eval_runs_with_the_network_unavailable(kinds, tmp_path):
    blocker = tmp_path / "offline"
    blocker.mkdir()
    blocker.joinpath("sitecustomize.py").write_text(
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('the network is off for this test')\n"
        "socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse\n")
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--model", kinds["package"], "--baseline", kinds["onnx"], "--data", UD / "de_gsd_test.txt",
                     "--windows", 2, "--prompts", 3, "--new-tokens", 8, "--json", out,
                     env={"PYTHONPATH": str(blocker), "NLTK_DATA": str(NLTK_DATA)})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["all"]["vs_reference"]["meteor"] is not None and report["all"]["top1_agreement"] >= 0.99
    assert report["languages"]["de"]["prompts"] == 3
    # and the blocker works: a connection attempt under it fails
    blocked = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                             env={"PYTHONPATH": str(blocker)}, capture_output=True, text=True)
    assert "the network is off" in blocked.stderr


def test_without_wordnet_it_says_how_to_get_it_and_reports_the_rest(kinds, tmp_path):
    out = tmp_path / "eval.json"
    result = run_cli("eval", "--model", kinds["onnx"], "--data", UD / "es_gsd_test.txt", "--windows", 2,
                     "--prompts", 2, "--new-tokens", 4, "--json", out,
                     env={"NLTK_DATA": str(tmp_path / "empty")}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "METEOR left out: WordNet not found" in result.stderr and "NLTK_DATA" in result.stderr
    figures = json.loads(out.read_text())["all"]
    assert figures["vs_reference"]["meteor"] is None and figures["vs_reference"]["bleu"] is not None
    assert figures["bits_per_byte"] > 0


@pytest.fixture(scope="module")
def foreign_tokenizer_checkpoint(nano_checkpoint, tmp_path_factory, small_corpus):
    from spj_edge.checkpoint import save_checkpoint
    from spj_edge.tokenizer import train_tokenizer

    model, _ = load_checkpoint(nano_checkpoint)
    other = train_tokenizer([SHAKESPEARE.joinpath("val.txt").read_text()[:50_000]], 300)
    out = tmp_path_factory.mktemp("foreign") / "ckpt"
    save_checkpoint(out, model, other)
    return out


@pytest.mark.parametrize("case", ["missing model", "not a model", "missing data", "binary data", "other tokenizer",
                                  "zero windows"])
def test_bad_input_gives_one_line(case, kinds, tmp_path, foreign_tokenizer_checkpoint):
    model, data, extra = kinds["onnx"], UD / "en_ewt_test.txt", []
    if case == "missing model":
        model, fragments = tmp_path / "nope", [str(tmp_path / "nope"), "no such file or directory"]
    elif case == "not a model":
        model, fragments = tmp_path, [str(tmp_path), "not a model"]
    elif case == "missing data":
        data, fragments = tmp_path / "gone.txt", [str(tmp_path / "gone.txt"), "no such file"]
    elif case == "binary data":
        data = tmp_path / "blob.txt"
        data.write_bytes(bytes(range(256)))
        fragments = [str(data), "binary file"]
    elif case == "other tokenizer":
        extra, fragments = ["--baseline", foreign_tokenizer_checkpoint], ["its tokenizer is not"]
    else:
        extra, fragments = ["--windows", "0"], ["--windows 0: must be ≥ 1"]
    result = cli("eval", "--model", model, "--data", data, *extra, cwd=REPO)
    assert_one_line_error(result, *fragments)
