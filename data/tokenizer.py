"""Tokenizers behind one small interface, with a fingerprint that names the exact vocabulary.

Three kinds, picked by name:

    bpe            a byte-level BPE trained here on a corpus at first use, then cached as JSON
    hf             a Hugging Face `tokenizer.json` (e.g. from a Gemma checkpoint)
    sentencepiece  a `tokenizer.model` (needs the optional `sentencepiece` package)

    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(kind="bpe", train_on="kjv", vocab_size=4096, cache_dir="runs/cache")
    ids = tok.encode("In the beginning")            # no BOS/EOS: the data pipeline adds them
    assert tok.decode(ids) == "In the beginning"

`fingerprint()` is a sha256 of the serialized tokenizer: anything that stores token ids (token
caches, logit stores, checkpoints) records it and refuses to mix ids from another vocabulary.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import tokenizers

from data.corpus import CorpusSpec, Document, corpus_fingerprint, load_documents

# Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3; the chat turn markers are reserved as
# single tokens so that chat data (SFT, RL) never splits them into pieces.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

KINDS = ("bpe", "hf", "sentencepiece")
# Part of the BPE cache key: change it whenever the training recipe below changes, so that an
# old cached file is never mistaken for the new recipe's output.
_BPE_RECIPE = "bytelevel-bpe-v1"
_MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)

# Names other vocabularies use for the same roles, tried in order when loading a tokenizer.json.
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "[CLS]")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]")
_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of the code may rely on, whatever the kind."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def fingerprint(self) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` (our trained BPE or a loaded tokenizer.json).

    encode() adds no BOS/EOS (the pipeline decides where documents start and end) but does map
    special-token strings in the text, e.g. "<start_of_turn>", to their ids, as Gemma's does;
    decode() keeps special tokens, so chat-formatted text round-trips.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, source: str):
        self._tok = tok
        self.source = source
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = _first_id(tok, _EOS_NAMES)
        if eos is None:
            raise ValueError(f"tokenizer {source}: no end-of-sequence token, tried {_EOS_NAMES}")
        self.eos_id = eos
        # GPT-2 style vocabularies have one <|endoftext|> for both ends; padding is always
        # masked out, so reusing EOS for it is harmless.
        bos = _first_id(tok, _BOS_NAMES)
        pad = _first_id(tok, _PAD_NAMES)
        self.bos_id = eos if bos is None else bos
        self.pad_id = eos if pad is None else pad
        self._fingerprint = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in Rust threads (honours TOKENIZERS_PARALLELISM)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def fingerprint(self) -> str:
        return self._fingerprint

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json atomically (a concurrent reader sees the old file or the new)."""
        _atomic_write_text(os.fspath(path), self._tok.to_str())

    def __repr__(self) -> str:
        return f"HFTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
    """A SentencePiece `tokenizer.model`, e.g. the one shipped with Gemma checkpoints."""

    def __init__(self, path: str | os.PathLike):
        try:
            import sentencepiece
        except ImportError as e:
            raise ImportError(
                "kind='sentencepiece' needs the sentencepiece package: pip install sentencepiece"
            ) from e
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        self.source = path
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise ValueError(f"sentencepiece model {path} defines no EOS id")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        self._fingerprint = hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def fingerprint(self) -> str:
        return self._fingerprint

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"


def _first_id(tok: tokenizers.Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


def _atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def train_bpe(*, texts: Sequence[str], vocab_size: int) -> HFTokenizer:
    """Trains a byte-level BPE with Gemma's special-token layout; same texts -> same fingerprint.

    Byte-level means every string encodes (no <unk> in practice) and decode(encode(s)) == s.
    The `tokenizers` trainer breaks ties between equally frequent pairs by the pair itself, not
    by hash order, so two trainings give identical files (tests/test_data.py trains twice; it
    also holds across processes and with TOKENIZERS_PARALLELISM on or off).
    """
    if vocab_size < _MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{_MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return HFTokenizer(tok, source=f"bpe(vocab_size={vocab_size})")


def bpe_cache_path(*, cache_dir: str | os.PathLike, vocab_size: int, corpus_sha256: str) -> str:
    """Where the BPE for this vocabulary size, corpus text and recipe is cached."""
    key = hashlib.sha256(f"{_BPE_RECIPE}|{vocab_size}|{corpus_sha256}".encode()).hexdigest()
    return os.path.join(os.fspath(cache_dir), f"bpe-{vocab_size}-{key[:16]}.json")


def load_or_train_bpe(
    *, texts: Sequence[str], vocab_size: int, cache_dir: str | os.PathLike | None
) -> HFTokenizer:
    """The cached BPE for exactly these texts and vocabulary size, trained and cached if absent.

    The cache key covers the text itself (not a corpus name), so editing a corpus file retrains
    instead of silently reusing a vocabulary built from other text.
    """
    if cache_dir is None:
        return train_bpe(texts=texts, vocab_size=vocab_size)
    corpus_sha = corpus_fingerprint(Document(id="", text=t) for t in texts)
    path = bpe_cache_path(cache_dir=cache_dir, vocab_size=vocab_size, corpus_sha256=corpus_sha)
    if os.path.exists(path):
        tok = load_hf(path)
        _check_bpe_layout(tok, path=path)
        return tok
    tok = train_bpe(texts=texts, vocab_size=vocab_size)
    tok.save(path)
    tok.source = path
    return tok


def _check_bpe_layout(tok: HFTokenizer, *, path: str) -> None:
    for want, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != want:
            raise ValueError(
                f"cached tokenizer {path} has {name!r} at id {tok.token_to_id(name)}, "
                f"expected {want}; delete the file to retrain it"
            )


def load_hf(path: str | os.PathLike) -> HFTokenizer:
    """A Hugging Face tokenizer.json, given as the file or the directory holding it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return HFTokenizer(tokenizers.Tokenizer.from_file(path), source=path)


def load_tokenizer(
    *,
    kind: str,
    vocab_size: int | None = None,
    train_on: CorpusSpec = "kjv",
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """The tokenizer a config names.

    kind="bpe" trains on every document of `train_on` (the held-out split included: the
    vocabulary is preprocessing, like Gemma's, not a model fitted to train data) with
    `vocab_size`, cached in `cache_dir`; kind="hf" and kind="sentencepiece" load `path`.
    """
    if kind == "bpe":
        if vocab_size is None:
            raise ValueError("tokenizer kind='bpe' needs vocab_size")
        texts = [d.text for d in load_documents(train_on)]
        return load_or_train_bpe(texts=texts, vocab_size=vocab_size, cache_dir=cache_dir)
    if kind in ("hf", "sentencepiece"):
        if path is None:
            raise ValueError(f"tokenizer kind={kind!r} needs path")
        return load_hf(path) if kind == "hf" else SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {list(KINDS)}")
