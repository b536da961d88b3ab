"""`spj-edge tokenizer`: train a byte-level BPE tokenizer on text files, check that it round-trips them, and report
bytes per token for each."""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer

from .data import read_texts
from .errors import SPJError
from .outputs import check_output, name_output, write_json
from .tables import print_summary
from .tokenizer import SPECIAL_TOKENS, save_tokenizer, train_tokenizer


def build_tokenizer(data: list, vocab_size: int, out: Path, overwrite: bool = False) -> Tokenizer:
    """The `spj-edge tokenizer` stage: train, check the round trip, report bytes per token for every file."""
    out = Path(out)
    report = out.with_suffix(".report.json")
    for path in (out, report):  # the report is an output too: replaced only with --overwrite, as the tokenizer is
        check_output(path, data, overwrite=overwrite, suffix=".json")
    texts = read_texts(data)
    tokenizer = train_tokenizer(texts.values(), vocab_size)
    per_file = {}
    for path, text in texts.items():
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if tokenizer.decode(ids, skip_special_tokens=False) != text:
            raise SPJError(f"{path}: the trained tokenizer does not round-trip this text")
        per_file[str(path)] = {"bytes": len(text.encode("utf-8")), "tokens": len(ids),
                               "bytes_per_token": len(text.encode("utf-8")) / len(ids)}
    out.parent.mkdir(parents=True, exist_ok=True)
    # The tokenizer goes into place last, after its report: a failure (a full disk) leaves neither file half-written.
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save_tokenizer(tokenizer, tmp)
        write_json(report, {"stage": "tokenizer", "vocab_size": tokenizer.get_vocab_size(),
                            "special_tokens": list(SPECIAL_TOKENS), "files": per_file})
        tmp.replace(out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        name_output(e, out, tmp)
        raise
    print_summary(f"tokenizer: {out} ({tokenizer.get_vocab_size()} tokens), bytes per token",
                  [(Path(p).name, round(f["bytes_per_token"], 2)) for p, f in per_file.items()])
    return tokenizer
