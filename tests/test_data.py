"""Tests for data/: corpora and the held-out split, tokenizers, packing, order, sharding, resume.

The BPE used here is trained on a 60-chapter slice of the KJV at vocab 512 so the module runs in
seconds; `PYTHONPATH=. python -m pytest tests/test_data.py -q`.
"""

import json
import os
import re

import numpy as np
import pytest

from data import corpus as corpus_lib
from data import pipeline
from data import tokenizer as tokenizer_lib
from data.corpus import Document, load_documents
from data.pipeline import PackedRows, TokenizedCorpus

SEQ_LEN = 64
FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def kjv_docs():
    return load_documents("kjv")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def slice_file(kjv_docs, tmp_path_factory):
    """60 chapters as plain text, one blank line between chapters (verses are single lines)."""
    path = tmp_path_factory.mktemp("corpus") / "kjv_slice.txt"
    path.write_text("\n\n".join(d.text for d in kjv_docs[:60]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def slice_spec(slice_file):
    return {"text": slice_file}


@pytest.fixture(scope="module")
def tiny_spec(kjv_docs, tmp_path_factory):
    """Genesis 1-6 (~9k tokens, ~140 rows of 64): small enough that tests cross epochs."""
    path = tmp_path_factory.mktemp("tiny") / "genesis.txt"
    path.write_text("\n\n".join(d.text for d in kjv_docs[:6]), encoding="utf-8")
    return {"text": str(path)}


@pytest.fixture(scope="module")
def tok(slice_spec, cache_dir):
    return tokenizer_lib.load_tokenizer(
        kind="bpe", vocab_size=512, train_on=slice_spec, cache_dir=cache_dir
    )


@pytest.fixture(scope="module")
def rows(slice_spec, tok, cache_dir):
    docs = load_documents(slice_spec, split="train")
    return pipeline.packed_rows(docs=docs, tokenizer=tok, seq_len=SEQ_LEN, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def tiny_rows(tiny_spec, tok, cache_dir):
    docs = load_documents(tiny_spec, split="train")
    return pipeline.packed_rows(docs=docs, tokenizer=tok, seq_len=SEQ_LEN, cache_dir=cache_dir)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for k in FIELDS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------------------------
# Corpora


def test_kjv_is_chapters_with_every_verse(kjv_docs):
    assert len(kjv_docs) == 1189
    assert kjv_docs[0].id == "kjv/Genesis/1"
    assert kjv_docs[0].text.startswith("Genesis 1\nIn the beginning God created")
    assert kjv_docs[-1].id == "kjv/Revelation/22"
    # One heading line per chapter, then the 31,102 verses of the KJV, numbers stripped.
    assert sum(d.text.count("\n") for d in kjv_docs) == 31102
    assert not any(re.search(r"\d+:\d+", d.text) for d in kjv_docs)
    # Exodus 7:1 is stored inside the row of 6:30; it must open chapter 7, not close chapter 6.
    exodus7 = next(d for d in kjv_docs if d.id == "kjv/Exodus/7")
    assert exodus7.text.splitlines()[1].startswith("And the LORD said unto Moses, See, I have")


def test_heldout_split_is_disjoint_covering_and_stable(kjv_docs):
    train = load_documents("kjv", split="train")
    held = load_documents("kjv", split="eval")
    train_ids, eval_ids = {d.id for d in train}, {d.id for d in held}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == {d.id for d in kjv_docs}
    assert 0.01 < len(held) / len(kjv_docs) < 0.04  # default fraction 0.02
    assert [d.id for d in load_documents("kjv", split="eval")] == [d.id for d in held]
    bigger = load_documents("kjv", split="eval", heldout_fraction=0.1)
    assert eval_ids < {d.id for d in bigger}


def test_text_corpus_paragraphs_or_files(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\n\n\nthree\n  \nfour", encoding="utf-8")
    (tmp_path / "b.txt").write_text("five", encoding="utf-8")
    pattern = str(tmp_path / "*.txt")
    paragraphs = [d.text for d in load_documents({"text": pattern})]
    assert paragraphs == ["one\ntwo", "three", "four", "five"]
    files = [d.text for d in load_documents({"text": pattern, "documents": "file"})]
    assert files == ["one\ntwo\n\n\nthree\n  \nfour", "five"]


def test_jsonl_and_array_record_corpora(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "alpha"}\n\n{"body": "beta", "x": 1}\n', encoding="utf-8")
    assert [d.text for d in load_documents({"jsonl": str(jsonl), "field": "body"})] == [
        "alpha",
        "beta",
    ]
    plain, records = str(tmp_path / "plain.array_record"), str(tmp_path / "json.array_record")
    for path, payloads in [
        (plain, ["gamma", "délta"]),
        (records, [json.dumps({"text": "epsilon"})]),
    ]:
        writer = ArrayRecordWriter(path, "group_size:1")
        for p in payloads:
            writer.write(p.encode("utf-8"))
        writer.close()
    assert [d.text for d in load_documents({"array_record": plain})] == ["gamma", "délta"]
    docs = load_documents({"array_record": records, "field": "text"})
    assert [d.text for d in docs] == ["epsilon"]


def test_corpus_errors_name_the_path_or_key(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_documents({"text": missing})
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_documents({"jsonl": str(tmp_path / "nope.jsonl")})
    with pytest.raises(ValueError, match=r"unknown corpus 'kvj'.*'kjv'"):
        load_documents("kvj")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: no field 'text'") + r".*'txt'"):
        load_documents({"jsonl": str(bad)})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['feild'\].*\['field'\]"):
        load_documents({"jsonl": str(bad), "feild": "text"})
    with pytest.raises(ValueError, match="exactly one of the keys"):
        load_documents({"path": "x"})
    with pytest.raises(ValueError, match="documents='lines'"):
        load_documents({"text": str(bad), "documents": "lines"})


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_bpe_special_tokens_follow_gemma(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert isinstance(tok, tokenizer_lib.Tokenizer)
    for i, name in enumerate(tokenizer_lib.SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i
    assert tok.vocab_size == 512
    chat = "<start_of_turn>user\nWho begat Enos?<end_of_turn>\n"
    ids = tok.encode(chat)
    assert ids[0] == tok.token_to_id("<start_of_turn>")
    assert tok.token_to_id("<end_of_turn>") in ids
    assert tok.decode(ids) == chat


def test_bpe_round_trips_kjv_and_any_unicode(tok, kjv_docs):
    # Chapters far outside the 60 the BPE was trained on, plus bytes it never saw.
    for doc in kjv_docs[500:520] + [Document(id="u", text="naïve — ünïcode ✓ 日本\t\n  x")]:
        ids = tok.encode(doc.text)
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == doc.text
        assert tok.decode(np.asarray(ids)) == doc.text


def test_bpe_training_is_deterministic_and_cached(kjv_docs, slice_spec, cache_dir, tok):
    texts = [d.text for d in kjv_docs[:20]]
    a = tokenizer_lib.train_bpe(texts=texts, vocab_size=400)
    b = tokenizer_lib.train_bpe(texts=texts, vocab_size=400)
    assert a.fingerprint() == b.fingerprint()
    assert tokenizer_lib.train_bpe(texts=texts, vocab_size=401).fingerprint() != a.fingerprint()
    # A second load reuses the cached file (same fingerprint, file untouched).
    cached = [f for f in os.listdir(cache_dir) if f.startswith("bpe-512-")]
    assert len(cached) == 1
    mtime = os.stat(cache_dir / cached[0]).st_mtime_ns
    again = tokenizer_lib.load_tokenizer(
        kind="bpe", vocab_size=512, train_on=slice_spec, cache_dir=cache_dir
    )
    assert again.fingerprint() == tok.fingerprint()
    assert os.stat(cache_dir / cached[0]).st_mtime_ns == mtime
    # The same file loads as a plain Hugging Face tokenizer.json, by file or by directory.
    hf = tokenizer_lib.load_tokenizer(kind="hf", path=cache_dir / cached[0])
    assert hf.fingerprint() == tok.fingerprint()
    (cache_dir / "hfdir").mkdir()
    (cache_dir / "hfdir" / "tokenizer.json").write_bytes((cache_dir / cached[0]).read_bytes())
    assert tokenizer_lib.load_hf(cache_dir / "hfdir").fingerprint() == tok.fingerprint()


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer kind 'wordpiece'.*'bpe'"):
        tokenizer_lib.load_tokenizer(kind="wordpiece", cache_dir=tmp_path)
    missing = str(tmp_path / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        tokenizer_lib.load_tokenizer(kind="hf", path=missing)
    with pytest.raises(ValueError, match="needs vocab_size"):
        tokenizer_lib.load_tokenizer(kind="bpe", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="too small"):
        tokenizer_lib.train_bpe(texts=["abc"], vocab_size=100)
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install sentencepiece"):
            tokenizer_lib.load_tokenizer(kind="sentencepiece", path=tmp_path / "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_rows_exact_example():
    # Document A = BOS 10 11 12 EOS, document B = BOS 13 EOS; rows of 4 cut A after 12.
    corpus = TokenizedCorpus(
        tokens=np.array([2, 10, 11, 12, 1, 2, 13, 1], np.int32),
        doc_starts=np.array([0, 5, 8], np.int64),
    )
    rows = PackedRows(corpus, seq_len=4, pad_id=0, num_rows=3)
    r0, r1, r2 = rows[0], rows[1], rows[2]
    np.testing.assert_array_equal(r0["inputs"], [2, 10, 11, 12])
    np.testing.assert_array_equal(r0["targets"], [10, 11, 12, 1])  # 12 -> EOS across rows
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 1, 1])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1])
    np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 3])
    np.testing.assert_array_equal(r1["inputs"], [1, 2, 13, 1])
    np.testing.assert_array_equal(r1["targets"], [0, 13, 1, 0])
    np.testing.assert_array_equal(r1["loss_mask"], [0, 1, 1, 0])  # no EOS -> BOS, no after-EOS
    np.testing.assert_array_equal(r1["segment_ids"], [1, 2, 2, 2])
    np.testing.assert_array_equal(r1["positions"], [0, 0, 1, 2])
    for k in FIELDS:  # an eval padding row
        np.testing.assert_array_equal(r2[k], np.zeros(4))


def test_packing_invariants(rows, tok):
    batch = rows.rows(np.arange(len(rows)))
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["loss_mask"]
    seg, pos = batch["segment_ids"], batch["positions"]
    real = seg > 0
    corpus = rows.corpus
    # No token lost or duplicated: the real slots, in row order, are the token stream.
    np.testing.assert_array_equal(inputs[real], corpus.tokens)
    assert (np.diff(real.ravel().astype(int)) <= 0).all()  # padding only after the last token
    # Every document starts with BOS, ends with EOS.
    np.testing.assert_array_equal(corpus.tokens[corpus.doc_starts[:-1]], tok.bos_id)
    np.testing.assert_array_equal(corpus.tokens[corpus.doc_starts[1:] - 1], tok.eos_id)
    # Segments are 1, 2, ... in order; positions restart at 0 and count up within one.
    new_seg = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
    assert (seg[:, 0] == 1).all()
    assert (np.diff(seg, axis=1)[real[:, 1:]] <= 1).all()
    assert (pos[new_seg & real] == 0).all()
    assert (pos[~new_seg & real] == pos[:, :-1][~new_seg[:, 1:] & real[:, 1:]] + 1).all()
    starts_at_bos = (inputs == tok.bos_id) & real
    assert (new_seg[starts_at_bos]).all()
    # Targets: the next input within a segment; masked after EOS and on padding.
    same = (seg[:, 1:] == seg[:, :-1]) & real[:, 1:]
    np.testing.assert_array_equal(targets[:, :-1][same], inputs[:, 1:][same])
    assert (mask[:, :-1][same] == 1).all()
    assert (mask[~real] == 0).all() and (mask[(inputs == tok.eos_id) & real] == 0).all()
    # A document cut at a row end keeps its next token as target: every in-document pair counts.
    assert mask.sum() == len(corpus.tokens) - corpus.num_docs
    flat_targets = targets[real][mask[real] == 1]
    pairs = corpus.tokens[1:][~np.isin(np.arange(1, len(corpus.tokens)), corpus.doc_starts)]
    np.testing.assert_array_equal(flat_targets, pairs)


def test_token_cache_is_keyed_by_text_and_tokenizer(rows, slice_spec, tok, cache_dir):
    docs = load_documents(slice_spec, split="train")
    key = pipeline.token_cache_key(docs=docs, tokenizer=tok)
    assert (cache_dir / f"tokens-{key}.npy").exists()
    cached = pipeline.tokenize_documents(docs=docs, tokenizer=tok, cache_dir=cache_dir)
    np.testing.assert_array_equal(cached.tokens, rows.corpus.tokens)
    fresh = pipeline.tokenize_documents(docs=docs, tokenizer=tok, cache_dir=None)
    np.testing.assert_array_equal(fresh.tokens, rows.corpus.tokens)
    np.testing.assert_array_equal(fresh.doc_starts, rows.corpus.doc_starts)
    assert pipeline.token_cache_key(docs=docs[1:], tokenizer=tok) != key


# ---------------------------------------------------------------------------------------------
# Order, epochs, sharding, resume


def test_one_epoch_serves_every_row_once(rows):
    source = pipeline.BatchSource(
        rows, global_batch_size=4, seed=7, num_epochs=1, process_index=0, process_count=1
    )
    assert len(source) == len(rows) // 4
    served = np.concatenate([source.row_ids(b) for b in range(len(source))])
    assert len(np.unique(served)) == len(served) == len(source) * 4
    assert not np.array_equal(served, np.arange(len(served)))  # shuffled
    source = pipeline.BatchSource(
        rows, global_batch_size=1, seed=7, num_epochs=2, process_index=0, process_count=1
    )
    ids = np.concatenate([source.row_ids(b) for b in range(len(source))])
    first, second = ids[: len(rows)], ids[len(rows) :]
    np.testing.assert_array_equal(np.sort(first), np.arange(len(rows)))
    np.testing.assert_array_equal(np.sort(second), np.arange(len(rows)))
    assert not np.array_equal(first, second)  # each epoch reshuffled
    batch = pipeline.batched(
        rows, global_batch_size=1, seed=7, num_epochs=2, process_index=0, process_count=1
    )[3]
    expected = rows.rows(ids[3:4])
    for k in FIELDS:
        np.testing.assert_array_equal(batch[k], expected[k])


def test_same_seed_same_batches(tiny_spec, tok, cache_dir):
    def first_batches(seed):
        ds = pipeline.train_dataset(
            corpus=tiny_spec,
            tokenizer=tok,
            seq_len=SEQ_LEN,
            global_batch_size=8,
            seed=seed,
            cache_dir=cache_dir,
            process_index=0,
            process_count=1,
        )
        return take(pipeline.make_iterator(ds), 5)

    a, b = first_batches(3), first_batches(3)
    assert_batches_equal(a, b)
    c = first_batches(4)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    assert a[0]["inputs"].shape == (8, SEQ_LEN) and a[0]["inputs"].dtype == np.int32
    assert a[0]["loss_mask"].dtype == np.float32


def test_two_processes_split_each_global_batch(tiny_rows):
    def batches(index, count):
        ds = pipeline.batched(
            tiny_rows,
            global_batch_size=8,
            seed=1,
            num_epochs=None,
            process_index=index,
            process_count=count,
        )
        # 60 batches of 8 cross several epochs of the ~140 rows.
        return take(pipeline.make_iterator(ds), 60)

    whole, p0, p1 = batches(0, 1), batches(0, 2), batches(1, 2)
    for g, a, b in zip(whole, p0, p1, strict=True):
        assert a["inputs"].shape == (4, SEQ_LEN)
        for k in FIELDS:
            np.testing.assert_array_equal(g[k][:4], a[k])
            np.testing.assert_array_equal(g[k][4:], b[k])
    sources = [
        pipeline.BatchSource(
            tiny_rows, global_batch_size=8, seed=1, num_epochs=1, process_index=p, process_count=2
        )
        for p in range(2)
    ]
    served = [np.concatenate([s.row_ids(b) for b in range(len(s))]) for s in sources]
    assert not set(served[0]) & set(served[1])
    assert len(set(served[0]) | set(served[1])) == len(tiny_rows) // 8 * 8
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        pipeline.batched(
            tiny_rows, global_batch_size=8, seed=1, num_epochs=1, process_count=3, process_index=0
        )


def test_iterator_state_restores_exactly(tiny_spec, tiny_rows, tok, cache_dir):
    def dataset():
        return pipeline.train_dataset(
            corpus=tiny_spec,
            tokenizer=tok,
            seq_len=SEQ_LEN,
            global_batch_size=8,
            seed=11,
            cache_dir=cache_dir,
            process_index=0,
            process_count=1,
        )

    uninterrupted = take(pipeline.make_iterator(dataset()), 40)
    assert 13 * 8 < len(tiny_rows) < 40 * 8  # the resumed part crosses an epoch boundary
    it = pipeline.make_iterator(dataset())
    take(it, 13)
    state = json.loads(json.dumps(it.get_state()))  # survives a trip through a checkpoint
    resumed = pipeline.make_iterator(dataset())
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 27), uninterrupted[13:])
    threaded = pipeline.make_iterator(dataset(), num_threads=2)
    threaded.set_state(state)
    assert_batches_equal(take(threaded, 5), uninterrupted[13:18])


def test_finite_epochs_and_eval_set(slice_spec, tok, cache_dir):
    common = dict(corpus=slice_spec, tokenizer=tok, seq_len=SEQ_LEN, cache_dir=cache_dir)
    train = pipeline.train_dataset(
        **common, global_batch_size=8, seed=0, num_epochs=3, process_index=0, process_count=1
    )
    assert len(list(pipeline.make_iterator(train))) == len(train) > 0
    eval_docs = load_documents(slice_spec, split="eval")
    eval_tokens = sum(len(tok.encode(d.text)) + 1 for d in eval_docs)  # pairs: ids + EOS each
    per_process = []
    for p in range(2):
        ds = pipeline.eval_dataset(**common, global_batch_size=4, process_index=p, process_count=2)
        once, twice = list(pipeline.make_iterator(ds)), list(pipeline.make_iterator(ds))
        assert_batches_equal(once, twice)  # fixed: same batches every evaluation
        per_process.append(once)
    assert len(per_process[0]) == len(per_process[1])  # every process runs the same eval steps
    total = sum(float(b["loss_mask"].sum()) for batches in per_process for b in batches)
    assert total == eval_tokens  # nothing dropped, nothing padded counted


def test_corpus_module_lists_registered_names():
    assert "kjv" in corpus_lib.corpus_names()


def test_max_rows_and_row_ids(slice_spec, tok, cache_dir, rows):
    ds = pipeline.train_dataset(
        corpus=slice_spec,
        tokenizer=tok,
        seq_len=SEQ_LEN,
        global_batch_size=4,
        seed=3,
        cache_dir=cache_dir,
        num_epochs=2,
        max_rows=10,
        with_row_ids=True,
        process_index=0,
        process_count=1,
    )
    batches = [ds[i] for i in range(len(ds))]
    assert len(batches) == 5  # 2 epochs x 10 rows / 4, cut to whole batches
    ids = np.concatenate([b["row_ids"] for b in batches])
    assert sorted(ids[:10].tolist()) == list(range(10))  # one epoch: each of the 10 rows once
    for b in batches:  # the ids name the rows served
        want = rows.rows(b["row_ids"])
        np.testing.assert_array_equal(b["inputs"], want["inputs"])
    plain = pipeline.train_dataset(
        corpus=slice_spec,
        tokenizer=tok,
        seq_len=SEQ_LEN,
        global_batch_size=4,
        seed=3,
        cache_dir=cache_dir,
        process_index=0,
        process_count=1,
    )
    assert "row_ids" not in plain[0]
