"""Teacher-target store: sampling statistics, record round trips, shards, resume, checks, size."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from data import logit_store as ls


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@functools.cache
def _zipf_entropy_table(vocab):
    """Entropy (nats) of p(r) ~ r^-s over ranks 1..vocab, on a grid of exponents s."""
    logr = np.log(np.arange(1, vocab + 1, dtype=np.float64))
    s_grid = np.geomspace(0.6, 40, 48)
    table = []
    for s in s_grid:
        lp = _log_softmax(-s * logr)
        table.append(-(np.exp(lp) * lp).sum())
    return s_grid, np.array(table)


def zipf_logits(rng, *, vocab, entropies):
    """Synthetic teacher logits [t, vocab]: a Zipf law over a random permutation of the ids.

    p(rank r) ~ r^-s, with s per position chosen so that the position has the given entropy.
    Zipf because token frequencies and LM next-token distributions are power-law-like with a
    heavy tail (the tail is what makes K draws land on many distinct ids, so it is the part
    that sets the store's size); a random permutation per position because a context's likely
    tokens are not neighbours in id space (pessimistic: real tokenizers give frequent tokens
    small ids, which shortens the id gaps).
    """
    s_grid, table = _zipf_entropy_table(vocab)
    s = np.interp(entropies, table[::-1], s_grid[::-1])
    logr = np.log(np.arange(1, vocab + 1, dtype=np.float64))
    out = np.empty((len(entropies), vocab), np.float32)
    for i in range(len(entropies)):
        out[i, rng.permutation(vocab)] = -s[i] * logr
    return out


def _meta(**over):
    meta = dict(
        params_sha256="ab" * 32,
        tokenizer_fingerprint="cd" * 32,
        vocab_size=512,
        method="sampled",
        k=32,
        temperature=1.0,
        logprob_dtype="bf16",
        seq_len=8,
        teacher="toy",
    )
    meta.update(over)
    return meta


@functools.cache
def _row_targets(row, method, k, seed=0):
    """One packed row's targets: a pure function of the row index (like the pipeline's rows)."""
    logits = np.random.default_rng(1000 + row).normal(size=(1, 8, 512)).astype(np.float32) * 3
    t = ls.sample_targets(
        key=jax.random.fold_in(jax.random.key(seed), row),
        logits=jnp.asarray(logits),
        method=method,
        k=k,
    )
    return {n: np.asarray(x[0]) for n, x in t.items()}


def _targets(rows, meta, seed=0):
    per_row = [_row_targets(int(r), meta["method"], meta["k"], seed) for r in rows]
    return {n: np.stack([t[n] for t in per_row]) for n in per_row[0]}


def _write(directory, rows, meta, *, rows_per_shard=4, batch=3, close=True):
    w = ls.LogitStoreWriter(directory, process_index=0, meta=meta, rows_per_shard=rows_per_shard)
    done = set(w.completed_rows().tolist())
    todo = [r for r in rows if r not in done]
    for i in range(0, len(todo), batch):
        w.write_batch(todo[i : i + batch], _targets(todo[i : i + batch], meta))
    if close:
        w.close()
    return w


# --- sampling --------------------------------------------------------------------------------


def test_sampled_targets_converge_to_the_teacher():
    vocab, k, positions = 48, 256, 1024
    logits = jnp.asarray(np.random.default_rng(0).normal(size=vocab) * 1.5, jnp.float32)
    p = np.exp(_log_softmax(np.asarray(logits)))
    t = ls.sample_targets(
        key=jax.random.key(0),
        logits=jnp.broadcast_to(logits, (2, positions // 2, vocab)),
        method="sampled",
        k=k,
    )
    ids, valid, lp, counts = (
        np.asarray(t[n]).reshape(positions, k)
        for n in ("ids", "valid", "teacher_logprobs", "counts")
    )
    assert np.all(counts.sum(-1) == k)
    assert np.all(valid == (np.arange(k) < valid.sum(-1, keepdims=True)))  # valid first
    inner = valid[:, 1:]
    assert np.all(ids[:, 1:][inner] > ids[:, :-1][inner])  # distinct, sorted by id
    assert np.all(ids[~valid] == -1) and np.all(counts[~valid] == 0) and np.all(lp[~valid] == 0)
    np.testing.assert_allclose(lp[valid], np.log(p)[ids[valid]], rtol=1e-5, atol=1e-5)

    # Draw frequencies match the teacher (5 sigma per id over 524k draws).
    freq = np.bincount(ids[valid], weights=counts[valid], minlength=vocab) / (positions * k)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / (positions * k)) + 1e-9)

    # The Gemma 3 target (the teacher restricted to the sampled ids, renormalised) is biased
    # toward frequent ids at small K (rare ids go missing) and converges to the teacher as K
    # grows.
    def target_error(k):
        t = ls.sample_targets(
            key=jax.random.key(k), logits=logits[None, None], method="sampled", k=k
        )
        ids, valid = np.asarray(t["ids"])[0, 0], np.asarray(t["valid"])[0, 0]
        q = np.zeros(vocab)
        q[ids[valid]] = np.exp(np.asarray(t["teacher_logprobs"])[0, 0][valid])
        return 0.5 * np.abs(q / q.sum() - p).sum()

    errors = [target_error(k) for k in (16, 256, 8192)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3, errors


def test_sampled_frequencies_with_padding_and_impossible_ids():
    # 1000 ids: chunks of 8, groups of 16 chunks, 8 groups = 1024 slots, 24 of them padding.
    # Every 7th id has probability 0 (logit -inf): neither they nor padding may ever be drawn.
    vocab, k, positions = 1000, 256, 2048
    logits = np.random.default_rng(5).normal(size=vocab).astype(np.float32) * 2
    logits[::7] = -np.inf
    p = np.exp(logits - logits[np.isfinite(logits)].max())
    p /= p.sum()
    t = ls.sample_targets(
        key=jax.random.key(3),
        logits=jnp.broadcast_to(jnp.asarray(logits), (4, positions // 4, vocab)),
        method="sampled",
        k=k,
    )
    ids, valid, counts = (
        np.asarray(t[n]).reshape(positions, k) for n in ("ids", "valid", "counts")
    )
    assert ids.max() < vocab and np.all(counts.sum(-1) == k)
    freq = np.bincount(ids[valid], weights=counts[valid], minlength=vocab) / (positions * k)
    assert np.all(freq[::7] == 0)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / (positions * k)) + 1e-9)


def test_sampling_resolves_the_tail_of_a_262k_vocabulary():
    # One id holds ~99.7% of the mass; 262143 others 1e-8 each, below the float32 spacing near
    # 1 (6e-8), where a single float32 CDF over the vocabulary can only give an id 0 or 6e-8.
    vocab, k, positions = 262144, 256, 32
    lp_tail = np.log(1e-8)
    logits = np.full(vocab, lp_tail, np.float32)
    logits[vocab // 2] = np.log(1 - 1e-8 * (vocab - 1))
    t = ls.sample_targets(
        key=jax.random.key(1),
        logits=jnp.broadcast_to(jnp.asarray(logits), (1, positions, vocab)),
        method="sampled",
        k=k,
    )
    ids, counts = np.asarray(t["ids"]), np.asarray(t["counts"])
    tail_draws = counts[(ids >= 0) & (ids != vocab // 2)].sum()
    n, p = positions * k, 1e-8 * (vocab - 1)
    assert abs(tail_draws - n * p) <= 5 * np.sqrt(n * p) + 1
    assert tail_draws > 0


def test_top_k_and_full_match_numpy():
    logits = np.random.default_rng(1).normal(size=(2, 5, 100)).astype(np.float32) * 2
    ref = _log_softmax(logits / 0.7)
    t = ls.sample_targets(
        key=jax.random.key(0), logits=jnp.asarray(logits), method="top_k", k=10, temperature=0.7
    )
    want = np.sort(np.argsort(-ref, axis=-1)[..., :10], axis=-1)
    np.testing.assert_array_equal(np.asarray(t["ids"]), want)
    np.testing.assert_allclose(
        np.asarray(t["teacher_logprobs"]), np.take_along_axis(ref, want, -1), atol=1e-5
    )
    assert np.all(np.asarray(t["valid"])) and not np.any(np.asarray(t["counts"]))
    f = ls.sample_targets(
        key=jax.random.key(0), logits=jnp.asarray(logits), method="full", k=0, temperature=0.7
    )
    np.testing.assert_allclose(np.asarray(f["teacher_logprobs"]), ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(f["ids"])[1, 2], np.arange(100))


def test_same_logits_and_key_give_the_same_bytes():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(1, 8, 512)) * 3, jnp.float32)

    def record(seed):
        t = ls.sample_targets(key=jax.random.key(seed), logits=logits, method="sampled", k=32)
        t = {n: np.asarray(x[0]) for n, x in t.items()}
        return ls.encode_row(t, row_index=3, vocab_size=512, method="sampled", k=32)

    assert record(0) == record(0)
    assert record(0) != record(1)


# --- records ---------------------------------------------------------------------------------


@functools.cache
def _zipf_targets(vocab, method, k):
    rng = np.random.default_rng(vocab + k)
    logits = zipf_logits(rng, vocab=vocab, entropies=rng.uniform(0.05, 6, 6))
    t = ls.sample_targets(
        key=jax.random.key(7), logits=jnp.asarray(logits)[None], method=method, k=k
    )
    return {n: np.asarray(x[0]) for n, x in t.items()}


@pytest.mark.parametrize("vocab", [4096, 262144])
@pytest.mark.parametrize("logprob_dtype", ["bf16", "u8"])
@pytest.mark.parametrize("method,k", [("sampled", 256), ("top_k", 128), ("full", 0)])
def test_encode_decode_round_trip(vocab, logprob_dtype, method, k):
    t = _zipf_targets(vocab, method, k)
    rec = ls.encode_row(
        t,
        row_index=123456789,
        vocab_size=vocab,
        method=method,
        k=k or vocab,
        logprob_dtype=logprob_dtype,
    )
    d = ls.decode_row(rec)
    assert d["row_index"] == 123456789
    for name in ("ids", "valid", "counts"):
        np.testing.assert_array_equal(d[name], t[name], err_msg=name)
    lp, got, valid = t["teacher_logprobs"], d["teacher_logprobs"], t["valid"]
    if logprob_dtype == "bf16":
        np.testing.assert_array_equal(got, lp.astype(ml_dtypes.bfloat16).astype(np.float32))
    else:
        # Quantised per position between its lowest (clipped at 60 nats below the highest)
        # and highest log-prob: within half a step, and clipped values decode to the lowest.
        hi = np.where(valid, lp, -np.inf).max(-1, keepdims=True)
        lo = np.maximum(np.where(valid, lp, np.inf).min(-1, keepdims=True), hi - 60)
        tol = (hi - lo) / 510 + 1e-5 * (1 + np.abs(lp))
        want = np.maximum(lp, lo)
        assert np.all((np.abs(got - want) <= tol)[valid])
        assert np.all(got[~valid] == 0)


def test_encode_rejects_unsorted_ids():
    t = {n: x[0] for n, x in _targets([0], _meta()).items()}
    t["ids"] = t["ids"].copy()
    t["ids"][0, :2] = t["ids"][0, 1::-1]
    with pytest.raises(ValueError, match="increasing"):
        ls.encode_row(t, row_index=0, vocab_size=512, method="sampled", k=32)


def test_bytes_per_token_for_gemma3_sized_targets():
    # 262k vocabulary, K=256 draws per token. Per-position entropies ~ exponential with mean
    # 2.5 nats (many confident positions, a long tail of uncertain ones), clipped to 8.
    rng = np.random.default_rng(0)
    seq, vocab = 96, 262144
    logits = zipf_logits(rng, vocab=vocab, entropies=np.clip(rng.exponential(2.5, seq), 0.01, 8))
    lp = _log_softmax(logits)
    assert 2.0 <= -(np.exp(lp) * lp).sum(-1).mean() <= 3.0
    t = ls.sample_targets(
        key=jax.random.key(0), logits=jnp.asarray(logits)[None], method="sampled", k=256
    )
    t = {n: np.asarray(x[0]) for n, x in t.items()}
    for dtype in ("bf16", "u8"):
        rec = ls.encode_row(
            t, row_index=0, vocab_size=vocab, method="sampled", k=256, logprob_dtype=dtype
        )
        assert len(rec) / seq <= 300, (dtype, len(rec) / seq)


# --- the store -------------------------------------------------------------------------------


def test_writer_reader_round_trip_random_access(tmp_path):
    meta = _meta()
    rows = list(range(23))
    _write(tmp_path, rows, meta, rows_per_shard=5, batch=4)
    manifest = ls.write_manifest(tmp_path, num_rows=23)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["manifest.json", "index-000.json"] + [f"shard-000-{n:05d}.array_record" for n in range(5)]
    )
    assert manifest["num_rows"] == 23 and manifest["num_tokens"] == 23 * 8
    assert manifest["vocab_size"] == 512 and manifest["teacher"] == "toy"
    assert [s["num_records"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])

    reader = ls.LogitStoreReader(tmp_path, verify="eager")
    reader.check_compatible(vocab_size=512, tokenizer_fingerprint="cd" * 32, seq_len=8)
    order = [17, 2, 22, 2, 9, 0, 14]
    got = reader.read_rows(order)
    assert got["ids"].shape == (7, 8, 32) and got["ids"].dtype == np.int32
    assert got["valid"].dtype == bool and got["teacher_logprobs"].dtype == np.float32
    assert got["counts"].dtype == np.int32
    want = _targets(order, meta)
    for name in ("ids", "valid", "counts"):
        np.testing.assert_array_equal(got[name], want[name])
    bf16 = want["teacher_logprobs"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got["teacher_logprobs"], bf16)
    with pytest.raises(KeyError, match="23"):
        reader.read_rows([23])


def test_two_processes_merge_into_one_manifest(tmp_path):
    meta = _meta(logprob_dtype="u8")
    for p, rows in ((0, [0, 1, 2, 6]), (1, [3, 4, 5])):
        w = ls.LogitStoreWriter(tmp_path, process_index=p, meta=meta, rows_per_shard=2)
        w.write_batch(rows, _targets(rows, meta))
        w.close()
    ls.write_manifest(tmp_path, num_rows=7)
    r = ls.LogitStoreReader(tmp_path)
    got = r.read_rows([5, 0, 6, 3])
    want = _targets([5, 0, 6, 3], meta)
    for name in ("ids", "valid", "counts"):
        np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(ValueError, match="missing"):
        ls.write_manifest(tmp_path, num_rows=9)


def test_resume_after_a_kill_gives_the_same_store(tmp_path):
    meta = _meta()
    rows = list(range(20))
    full = tmp_path / "full"
    _write(full, rows, meta, rows_per_shard=4, batch=2)
    ls.write_manifest(full, num_rows=20)

    part = tmp_path / "part"
    w = _write(part, rows[:11], meta, rows_per_shard=4, batch=2, close=False)
    del w  # killed: rows 8..10 sit in a temp file
    assert os.path.exists(part / "shard-000-00002.array_record.tmp")
    (part / "shard-000-00003.array_record").write_bytes(b"renamed but never committed")

    w = ls.LogitStoreWriter(part, process_index=0, meta=meta, rows_per_shard=4)
    np.testing.assert_array_equal(w.completed_rows(), np.arange(8))
    assert sorted(os.listdir(part)) == [
        "index-000.json",
        "shard-000-00000.array_record",
        "shard-000-00001.array_record",
    ]
    _write(part, rows, meta, rows_per_shard=4, batch=2)
    ls.write_manifest(part, num_rows=20)
    assert (part / "manifest.json").read_bytes() == (full / "manifest.json").read_bytes()
    for n in range(5):
        name = f"shard-000-{n:05d}.array_record"
        assert (part / name).read_bytes() == (full / name).read_bytes()

    with pytest.raises(ls.LogitStoreMismatch, match="params_sha256"):
        ls.LogitStoreWriter(part, meta=_meta(params_sha256="ef" * 32), rows_per_shard=4)


def test_corrupted_shard_is_named(tmp_path):
    meta = _meta()
    _write(tmp_path, list(range(8)), meta, rows_per_shard=4)
    ls.write_manifest(tmp_path, num_rows=8)
    path = tmp_path / "shard-000-00001.array_record"
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ls.LogitStoreCorrupt, match="shard-000-00001"):
        ls.LogitStoreReader(tmp_path, verify="eager")
    lazy = ls.LogitStoreReader(tmp_path)
    lazy.read_rows([0, 3])  # the intact shard
    with pytest.raises(ls.LogitStoreCorrupt, match="shard-000-00001.*checksum"):
        lazy.read_rows([5])
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(ls.LogitStoreCorrupt, match="shard-000-00001"):
        ls.LogitStoreReader(tmp_path, verify="none")


def test_mismatched_store_is_refused_by_field(tmp_path):
    _write(tmp_path, list(range(4)), _meta(), rows_per_shard=4)
    ls.write_manifest(tmp_path)
    r = ls.LogitStoreReader(tmp_path)
    with pytest.raises(ls.LogitStoreMismatch, match=r"vocab_size is 512 .* but 1024"):
        r.check_compatible(vocab_size=1024, tokenizer_fingerprint="cd" * 32, seq_len=8)
    with pytest.raises(ls.LogitStoreMismatch, match="tokenizer_fingerprint"):
        r.check_compatible(vocab_size=512, tokenizer_fingerprint="00" * 32, seq_len=8)
    with pytest.raises(ls.LogitStoreMismatch, match="seq_len is 8"):
        r.check_compatible(vocab_size=512, tokenizer_fingerprint="cd" * 32, seq_len=16)
    with pytest.raises(ls.LogitStoreMismatch, match="method"):
        r.check_compatible(
            vocab_size=512, tokenizer_fingerprint="cd" * 32, seq_len=8, method="top_k"
        )
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ls.LogitStoreMismatch, match="format_version"):
        ls.LogitStoreReader(tmp_path)
