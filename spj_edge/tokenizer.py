"""Tokenizers: the byte-level BPE our presets train, and any Hugging Face tokenizer a real checkpoint brings.

A `TextTokenizer` is a `tokenizers.Tokenizer` with the facts Hugging Face keeps in files beside tokenizer.json:
tokenizer_config.json (the bos, eos and pad tokens, a chat template), chat_template.jinja (where
transformers 5 writes the template) and generation_config.json (the ids that end generation, sampling defaults).
Every stage that writes a tokenizer writes those files too, as it read them (`save_tokenizer_files`).

The rules, each as transformers applies it:
- <bos>: the tokenizer's own post-processor puts it in front of a prompt, or not (SmolLM2's adds none). Ours is a
  TemplateProcessing that adds <|bos|>. tokenizer_config.json's add_bos_token changes nothing: transformers 5 takes
  a byte-level tokenizer.json's post-processor as it is, whatever that says (measured with 5.24), and so do we.
- EOS: every id generation_config.json lists ends generation, and the tokenizer_config.json's eos_token.
- bits per byte: a special or added token stands for no bytes of text.
- a user's text is text: `<|im_end|>` typed in a prompt or a chat message is its characters, never the special id
  (`tokenizers` would make it one). Only the code, and a chat template's own markup, put special ids in a sequence.

A tokenizer.json with no tokenizer_config.json beside it is spj-edge's own: its special tokens are PAD, BOS and EOS.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .document_encoder import FastEncoder, checked_encoder, end_to_end
from .errors import SPJError
from .sampling import GENERATION_DEFAULTS, SamplingParams

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # our presets' ids 0, 1, 2: SPJConfig's defaults

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG, CHAT_TEMPLATE, GENERATION_CONFIG = "tokenizer_config.json", "chat_template.jinja", \
    "generation_config.json"
TEXT_FILES = (TOKENIZER_CONFIG, CHAT_TEMPLATE, GENERATION_CONFIG)  # Hugging Face's, beside tokenizer.json
# Read whole into memory: a real tokenizer_config.json with its added_tokens_decoder is under 1 MB, a chat template a
# few KB (the largest known, tool-calling ones, about 20 KB).
TEXT_FILE_MAX_BYTES = 16 << 20
CHAT_TEMPLATE_MAX_CHARS = 64 << 10  # a manifest (1 MiB at most) holds one, JSON-escaped
EOS_IDS_MAX = 64  # generation_config.json lists a few at most


# --- our presets' tokenizer ------------------------------------------------------------------------------------------
def train_tokenizer(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise SPJError(f"--vocab-size must be at least {min_size} (256 bytes and {len(SPECIAL_TOKENS)} special "
                       f"tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer.of(tokenizer)


def _our_bos_processor(tokenizer: Tokenizer) -> processors.TemplateProcessing:
    """<|bos|> in front of every sequence, as our models are trained; in tokenizer.json, so that transformers and any
    other runtime reading it put it there too."""
    return processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                         special_tokens=[(BOS, tokenizer.token_to_id(BOS))])


def specials_as_text(tokenizer: Tokenizer) -> Tokenizer:
    """Make `tokenizer` encode the text of its special tokens as ordinary bytes, and return it.

    By default `tokenizers` turns the text `<|eos|>` into the EOS id wherever it appears, so a prompt quoting it would
    stop generation, and decoding (which skips special ids) would drop it from the round trip. The setting is not
    saved in tokenizer.json, so every place that makes a Tokenizer applies it."""
    tokenizer.encode_special_tokens = True
    return tokenizer


# --- the tokenizer and its facts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpecialIds:
    bos: int | None  # what the post-processor puts in front, and what a chat template calls bos_token
    eos: tuple[int, ...]  # every id that ends generation; the first ends a document in our data streams
    pad: int  # fills the left of a shorter prompt in a batch, masked out: any id would do
    adds_bos: bool  # whether encoding a prompt puts <bos> in front of it


class TextTokenizer:
    """A `tokenizers.Tokenizer` (`backend`) with its special ids, chat template, generation defaults and the Hugging
    Face files they came from. Everything else is the backend's: `encode`, `decode`, `get_vocab_size`, … pass through
    to it, so a TextTokenizer goes wherever a Tokenizer went."""

    def __init__(self, backend: Tokenizer, special: SpecialIds, chat_template: str | None = None,
                 generation: dict | None = None, files: dict[str, bytes] | None = None, source: str = TOKENIZER):
        self.backend = specials_as_text(backend)
        self.special = special
        self.chat_template = chat_template
        self.generation = {**GENERATION_DEFAULTS, **(generation or {})}  # the model's sampling defaults
        self.files = dict(files or {})  # TEXT_FILES as read, written again by save_tokenizer_files
        self.source = source
        self.document_encoder: str | None = None  # "fastokens" or "tokenizers", once chosen
        self._fast = None  # a document_encoder.FastEncoder when that is the choice

    def __getattr__(self, name: str):  # what the class lacks is the backend's
        return getattr(self.backend, name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fast": None}  # fastokens' tokenizer does not pickle: a copy makes its own

    def __setstate__(self, state: dict):
        """A copy, or one unpickled: the backend's encode_special_tokens (the guard on a user's text) is not part of
        what `tokenizers` pickles."""
        self.__dict__.update(state)
        specials_as_text(self.backend)
        if self.document_encoder is not None:
            self.use_document_encoder(self.document_encoder)

    @classmethod
    def of(cls, tokenizer: Tokenizer | TextTokenizer, source: str = TOKENIZER) -> TextTokenizer:
        """`tokenizer` itself, or a bare Tokenizer with the facts its tokenizer.json alone gives (our presets')."""
        return tokenizer if isinstance(tokenizer, TextTokenizer) else _from_files(tokenizer, {}, source)

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """tokenizer.json at `path`, with the Hugging Face files beside it."""
        path = Path(path)
        if not path.is_file():
            raise SPJError(f"{path}: {'is a directory, expected tokenizer.json' if path.is_dir() else 'no such file'}")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception with a serde message
            raise SPJError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        return _from_files(backend, {name: _read_text_file(path.parent / name) for name in TEXT_FILES
                                     if (path.parent / name).exists()}, str(path))

    # --- what the stages ask of it --------------------------------------------------------------------------------
    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self.special.eos

    def config_ids(self) -> dict[str, int | None]:
        """The ids as LlamaConfig names them: the model config's pad_token_id, bos_token_id and eos_token_id."""
        s = self.special
        return {"pad_token_id": s.pad, "bos_token_id": s.bos, "eos_token_id": s.eos[0] if s.eos else None}

    def encode_prompt(self, prompt: str, context: int) -> list[int]:
        """The prompt's ids as the tokenizer's post-processor frames them (our <bos> in front; SmolLM2's nothing);
        refused before any work if it fills the context."""
        check_utf8(prompt, "prompt")
        ids = self.backend.encode(prompt).ids
        check_prompt_fits(len(ids), context)
        return ids

    def encode_documents(self, documents: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The documents' ids end to end (uint32), each framed as a prompt is and ended with the first EOS id (if the
        tokenizer has one), and each one's length. The ids are `tokenizers`' own, computed by fastokens where it can
        (choose_document_encoder, on the first call)."""
        if self.document_encoder is None:
            self.choose_document_encoder(documents)
        if self._fast is not None:
            ids, offsets = self._fast.encode(documents)
        else:
            ids, offsets = end_to_end([e.ids for e in self.backend.encode_batch_fast(list(documents))])
        lengths = np.diff(offsets)
        if self.special.eos:
            ids = np.insert(ids, offsets[1:], self.special.eos[0])
            lengths += 1
        return ids, lengths

    def choose_document_encoder(self, sample: Sequence[str]) -> str:
        """Encode documents with fastokens, several times faster, if it takes this tokenizer and gives its ids for
        `sample` (document_encoder.checked_encoder); else with `tokenizers`. Returns the choice: "fastokens" or
        "tokenizers"."""
        self._fast = checked_encoder(self.backend, sample, self.source)
        self.document_encoder = "tokenizers" if self._fast is None else "fastokens"
        return self.document_encoder

    def use_document_encoder(self, name: str) -> None:
        """The choice choose_document_encoder made in another process (prepare's main one), not checked again."""
        self._fast = FastEncoder(self.backend) if name == "fastokens" else None
        self.document_encoder = name

    def byte_lengths(self, vocab_size: int) -> np.ndarray:
        """UTF-8 bytes each id stands for. Byte-level BPE maps every byte to one character of its alphabet, so a
        token's byte length is its string length; special and added tokens, and ids past the tokenizer's vocabulary,
        stand for no bytes."""
        lengths = np.zeros(vocab_size, dtype=np.int64)
        added = set(self.backend.get_added_tokens_decoder())
        for token, i in self.backend.get_vocab(with_added_tokens=False).items():
            if i < vocab_size and i not in added:
                lengths[i] = len(token)
        return lengths

    def files_to_save(self) -> dict[str, bytes]:
        """tokenizer.json as the backend is now, and the Hugging Face files as they were read."""
        return {TOKENIZER: self.backend.to_str(pretty=True).encode("utf-8"), **self.files}

    # --- chat -------------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: Sequence[dict], context: int, add_generation_prompt: bool = True) -> list[int]:
        """The ids of a conversation as the chat template renders it, as transformers' apply_chat_template gives them,
        except that a special token's text inside a message stays text. The template's own special tokens become
        their ids: the template is rendered with every special token's text in the messages replaced by a marker,
        the output split at the special tokens left (the template's), and each piece between encoded as text with
        the markers turned back into the text they stand for."""
        self.require_chat_template()
        messages = _checked_messages(messages)
        added = {t.content: (i, t) for i, t in self.backend.get_added_tokens_decoder().items() if t.special}
        specials = sorted(added, key=len, reverse=True)
        finder = re.compile("|".join(map(re.escape, specials))) if specials else None
        everything = "".join(v for m in messages for v in m.values())
        mark = next(chr(c) for c in range(0xF0000, 0xFFFFE) if chr(c) not in everything)  # a private-use character
        index = {s: n for n, s in enumerate(specials)}

        def hide(text: str) -> str:
            return finder.sub(lambda m: f"{mark}{index[m[0]]}{mark}", text) if finder else text

        def unhide(text: str) -> str:
            return re.sub(f"{mark}(\\d+){mark}", lambda m: specials[int(m[1])], text)

        rendered = render_chat(self.chat_template, [{k: hide(v) for k, v in m.items()} for m in messages],
                               add_generation_prompt, self._template_tokens(), self.source)
        pieces, ids = finder.split(rendered) if finder else [rendered], []
        between = finder.findall(rendered) if finder else []
        for n, special in enumerate(between):  # a special token that strips spaces beside it, as tokenizers does
            if added[special][1].lstrip:
                pieces[n] = pieces[n].rstrip()
            if added[special][1].rstrip:
                pieces[n + 1] = pieces[n + 1].lstrip()
        encoded = self.backend.encode_batch([unhide(p) for p in pieces], add_special_tokens=False)
        for n, piece in enumerate(encoded):
            ids += piece.ids
            if n < len(between):
                ids.append(added[between[n]][0])
        check_prompt_fits(len(ids), context, "conversation")
        return ids

    def require_chat_template(self) -> None:
        if self.chat_template is None:
            raise SPJError(f"{self.source}: this tokenizer has no chat template ({TOKENIZER_CONFIG}'s "
                           f"chat_template or {CHAT_TEMPLATE}); give prompts instead")

    def _template_tokens(self) -> dict[str, str | None]:
        """bos_token, eos_token and pad_token, as transformers hands them to a chat template."""
        def text(i):
            return None if i is None else self.backend.id_to_token(i)

        return {"bos_token": text(self.special.bos), "eos_token": text(self.special.eos[0] if self.special.eos
                                                                       else None), "pad_token": text(self.special.pad)}


def _checked_messages(messages) -> list[dict[str, str]]:
    if not isinstance(messages, (list, tuple)) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            and all(isinstance(v, str) for v in m.values()) for m in messages):
        raise SPJError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects with text "
                       "values")
    for m in messages:
        check_utf8(m["content"], f"a {m['role']} message")
    return [dict(m) for m in messages]


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, tokens: dict, source: str) -> str:
    """The template rendered as transformers renders it: jinja2's immutable sandbox (a template is someone else's
    code), trim_blocks and lstrip_blocks, loop controls, and its helpers raise_exception, tojson and strftime_now."""
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
    except SPJError:
        raise
    except Exception as e:  # jinja2's TemplateError and SecurityError, or whatever the template's code raised
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise SPJError(f"{source}: the chat template failed to render ({reason})") from None


@lru_cache(maxsize=8)
def _compiled(template: str):
    # jinja2 only for chat: a runtime that is only given prompts (a Pi without jinja2) never imports it
    from datetime import datetime

    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own escapes HTML characters, which transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception,
                               strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise SPJError(f"the chat template is not valid jinja ({e.message}, line {e.lineno})") from None


# --- reading Hugging Face's files ------------------------------------------------------------------------------------
def _read_text_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > TEXT_FILE_MAX_BYTES:
            raise SPJError(f"{path}: {size} bytes, more than the {TEXT_FILE_MAX_BYTES} spj-edge reads from it")
        data = path.read_bytes()
    except OSError as e:
        raise SPJError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SPJError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    return data


def _json_file(files: dict[str, bytes], name: str, where: Path) -> dict | None:
    if name not in files:
        return None
    try:
        obj = json.loads(files[name])
    except (json.JSONDecodeError, RecursionError) as e:
        raise SPJError(f"{where / name}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise SPJError(f"{where / name}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _from_files(backend: Tokenizer, files: dict[str, bytes], source: str) -> TextTokenizer:
    """The facts from tokenizer_config.json, chat_template.jinja and generation_config.json (`files`, as read), or,
    for a tokenizer.json alone, our presets' conventions."""
    where = Path(source).parent
    config = _json_file(files, TOKENIZER_CONFIG, where)
    generation = _json_file(files, GENERATION_CONFIG, where) or {}
    size = backend.get_vocab_size(with_added_tokens=True)

    ours = config is None  # a tokenizer.json alone: ours (or one from elsewhere that names no special tokens)
    if ours:
        config = {key: token for key, token in zip(("pad_token", "bos_token", "eos_token"), SPECIAL_TOKENS)
                  if backend.token_to_id(token) is not None}

    def token_id(key: str) -> int | None:
        """The id of a tokenizer_config.json token: its text, or {"content": text} as older transformers write it."""
        value = config.get(key)
        text = value.get("content") if isinstance(value, dict) else value
        if text is None:
            return None
        i = backend.token_to_id(text) if isinstance(text, str) else None
        if i is None:
            raise SPJError(f"{where / TOKENIZER_CONFIG}: {key} {text!r} is not a token of {TOKENIZER}")
        return i

    def generation_ids(key: str) -> list[int]:
        value = generation.get(key)
        ids = [] if value is None else value if isinstance(value, list) else [value]
        for i in ids:
            if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < size):
                raise SPJError(f"{where / GENERATION_CONFIG}: {key} {i!r} is not an id of the tokenizer's "
                               f"vocabulary of {size}")
        return ids

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    if ours and backend.post_processor is None and bos is not None:  # ours, saved before it carried its <bos>
        backend.post_processor = _our_bos_processor(backend)
    bos = bos if bos is not None else next(iter(generation_ids("bos_token_id")), None)
    eos = list(dict.fromkeys(i for i in (eos, *generation_ids("eos_token_id")) if i is not None))  # in order, once
    if len(eos) > EOS_IDS_MAX:
        raise SPJError(f"{where / GENERATION_CONFIG}: {len(eos)} eos_token_id values, more than {EOS_IDS_MAX}")
    pad = next(i for i in (pad, *generation_ids("pad_token_id"), *eos, 0) if i is not None)
    adds_bos = bos is not None and backend.encode("").ids[:1] == [bos]
    return TextTokenizer(backend, SpecialIds(bos, tuple(eos), pad, adds_bos),
                         _chat_template(files, config, where), _generation_defaults(generation, where), files, source)


def _chat_template(files: dict[str, bytes], config: dict, where: Path) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template: a string, or named templates (the default)."""
    if CHAT_TEMPLATE in files:
        template, origin = files[CHAT_TEMPLATE].decode("utf-8"), where / CHAT_TEMPLATE
    else:
        template, origin = config.get("chat_template"), where / TOKENIZER_CONFIG
        if isinstance(template, list):
            template = next((t.get("template") for t in template if isinstance(t, dict)
                             and t.get("name") == "default"), None)
    if template is None:
        return None
    if not isinstance(template, str):
        raise SPJError(f"{origin}: chat_template must be text, got {type(template).__name__}")
    if len(template) > CHAT_TEMPLATE_MAX_CHARS:
        raise SPJError(f"{origin}: a chat template of {len(template)} characters, more than {CHAT_TEMPLATE_MAX_CHARS}")
    return template


def _generation_defaults(generation: dict, where: Path) -> dict:
    """The sampling defaults generation_config.json gives, under our names: do_sample false is greedy (temperature
    0), as transformers samples only when told to. Keys it lacks keep GENERATION_DEFAULTS'."""
    defaults = {k: generation[k] for k in GENERATION_DEFAULTS if generation.get(k) is not None}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    for key, value in defaults.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SPJError(f"{where / GENERATION_CONFIG}: {key} must be a number, got {value!r}")
    tokens = defaults.get("max_new_tokens", 0)
    if not isinstance(tokens, int) or tokens < 0:
        raise SPJError(f"{where / GENERATION_CONFIG}: max_new_tokens must be an integer ≥ 0, got {tokens!r}")
    try:
        SamplingParams(**{k: v for k, v in defaults.items() if k != "max_new_tokens"})
    except SPJError as e:
        raise SPJError(f"{where / GENERATION_CONFIG}: {e}") from None
    return defaults


# --- the functions the stages call -----------------------------------------------------------------------------------
def load_tokenizer(path: str | Path | TextTokenizer) -> TextTokenizer:
    """tokenizer.json and the Hugging Face files beside it; a tokenizer already loaded is returned as it is."""
    return path if isinstance(path, TextTokenizer) else TextTokenizer.load(path)


def save_tokenizer(tokenizer: Tokenizer | TextTokenizer, path: str | Path) -> None:
    """tokenizer.json, byte for byte what `Tokenizer.save` writes; written from Python so that a failure (a full disk)
    is an OSError naming the file, not the bare Exception the Rust side raises."""
    Path(path).write_text(tokenizer.to_str(pretty=True), encoding="utf-8")


def save_tokenizer_files(tokenizer: Tokenizer | TextTokenizer, directory: str | Path) -> None:
    """tokenizer.json into `directory`, and the Hugging Face files that came with it (tokenizer_config.json,
    chat_template.jinja, generation_config.json): every stage's output carries them."""
    for name, data in TextTokenizer.of(tokenizer).files_to_save().items():
        (Path(directory) / name).write_bytes(data)


def special_token_ids(tokenizer: Tokenizer | TextTokenizer) -> dict[str, int | None]:
    """The model config's pad_token_id, bos_token_id and eos_token_id for this tokenizer."""
    return TextTokenizer.of(tokenizer).config_ids()


def token_byte_lengths(tokenizer: Tokenizer | TextTokenizer, vocab_size: int) -> np.ndarray:
    return TextTokenizer.of(tokenizer).byte_lengths(vocab_size)


def check_utf8(text: str, what: str) -> None:
    """A str can hold lone surrogates (from a filesystem name or stdin decoded with surrogateescape) that have no
    UTF-8 form; `tokenizers` refuses them with a bare TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SPJError(f"{what} is not valid Unicode text: {text[e.start:e.end]!a} at character {e.start} has no "
                       "UTF-8 form") from None


def check_prompt_fits(length: int, context: int, what: str = "prompt") -> None:
    if length >= context:
        raise SPJError(f"{what} is {length} tokens; the model's context is {context}, which leaves no room to "
                       "generate")


def check_matches_model(tokenizer: Tokenizer | TextTokenizer, vocab_size: int, source: str) -> None:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise SPJError(f"{source}: the tokenizer has {size} tokens but the model's vocabulary has {vocab_size}: "
                       "they do not belong together")
