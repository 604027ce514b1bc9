"""Offline teacher targets (the Gemma 3 recipe): sample them, encode them compactly, store them.

Three parts, used by the `sample_logits` stage (writer) and the `distill` stage (reader):

1. `sample_targets` (JAX, jit-able, float32): per position, the targets the distill loss needs.
     sampled  K draws with replacement from softmax(logits / T) (Gemma 3: K=256); the distinct
              ids, their draw counts and the teacher log-probabilities at them
     top_k    the exact k most probable ids and their log-probabilities
     full     the whole log-softmax (small vocabularies only)
   Every method returns ids sorted ascending, padded at the end with -1 (`valid` False,
   `teacher_logprobs` 0, `counts` 0). `teacher_logprobs` are log softmax(logits / T) over the
   full vocabulary, not renormalised: the loss renormalises over the valid ids. `counts` are
   the draws per id (summing to K) for "sampled" and 0 for the other methods (no draws).

2. `encode_row` / `decode_row` (numpy, host): one packed training row -> one compact record.

3. `LogitStoreWriter` / `write_manifest` / `LogitStoreReader`: ArrayRecord shards, one record
   per packed row, a JSON manifest, resumable at shard granularity, checksummed.

    from data import logit_store as ls
    # One key per row (fold_in of the row index): the draws, hence the bytes, then do not
    # depend on how rows were batched, e.g. before and after a restart.
    sample = jax.vmap(lambda key, lg: ls.sample_targets(key=key, logits=lg, method="sampled",
                                                       k=256))
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, row_ids)
    targets = sample(keys, logits[:, None])       # logits [b, t, V] -> [b, 1, t, 256]
    targets = {n: x[:, 0] for n, x in targets.items()}
    w = ls.LogitStoreWriter(out_dir, process_index=jax.process_index(), meta=meta,
                            rows_per_shard=64)
    done = set(w.completed_rows().tolist())       # skip these after a restart
    w.write_batch(row_ids, jax.device_get(targets))
    w.close()                                     # seals the last shard
    # (multi-process: barrier here) then on process 0:
    ls.write_manifest(out_dir, num_rows=num_rows)

    r = ls.LogitStoreReader(out_dir)
    r.check_compatible(vocab_size=V, tokenizer_fingerprint=tok.fingerprint(), seq_len=T)
    batch_targets = r.read_rows(row_ids)          # ids/valid/teacher_logprobs/counts [n, T, K]

Record layout (little-endian; one record per packed row; sections in this order):

    header    struct "<4sBBBBQIIII": magic b"DXLR", format version, method code
              (0 sampled, 1 top_k, 2 full), log-prob dtype code (0 bf16, 1 u8), reserved 0,
              global row index (u64), seq_len t, vocab_size V, n_max (K, k or V),
              byte length of the id section
    ns        [t] distinct ids per position minus 1, u8 if n_max <= 256, else u16 / u32
              (absent for "full": every position holds all V ids)
    counts    [sum ns] draws minus 1, u8 if K <= 256 else u16 ("sampled" only)
    ranges    [t, 2] float32 (lo, hi) per position ("u8" log-probs only)
    logprobs  [sum ns] bf16 bits (u16), or u8 q with logprob ~ lo + q * (hi - lo) / 255
    ids       "sampled" / "top_k": per position the sorted ids as LEB128 varints of
              id - previous id - 1 (previous = -1 at each position's first id); absent for
              "full"

Directory: `shard-{process:03d}-{n:05d}.array_record` (ArrayRecord, one record per chunk, zstd),
`index-{process:03d}.json` (each process's committed shards: the commit record that makes a
restart resumable), and `manifest.json` (process 0 merges the indexes at the end): format
version, the writer's meta (params_sha256, tokenizer_fingerprint, vocab_size, method, k,
temperature, logprob_dtype, seq_len, and any extra fields), num_rows, num_tokens, bytes,
bytes_per_token (shard files) and record_bytes_per_token (encoded records), and per shard its
file, process_index, sha256, bytes, num_records and row_runs: [[first_row, count], ...] in
record order, so record i of a shard is the i-th row of its runs.

Ids: at V = 262144 the gaps between K=256 draws' distinct ids are mostly under 2^14, so two
bytes where a fixed width would take three; at V = 4096 mostly one byte. u8 log-probs quantise
each position linearly between its own lowest and highest stored log-prob (both kept as
float32, the lowest clipped at highest - 60 nats); the error is at most half a step,
(hi - lo) / 510, e.g. 0.03 nats for a 15-nat spread. bf16 keeps 8 significant bits (relative
error <= 2^-9 of the log-prob).

Measured (tests/test_logit_store.py's synthetic teacher: Zipf over a random permutation of the
ids, per-position entropy exponential with mean 2.5 nats), sampled K=256 at V=262144: ~43
distinct ids per token, records ~216 bytes/token with bf16 log-probs and ~181 with u8; zstd in
the shard files takes that to ~170 / ~155.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

FORMAT_VERSION = 1
METHODS = ("sampled", "top_k", "full")
LOGPROB_DTYPES = ("bf16", "u8")
# One record per chunk: each row is read by itself (random access), and rows are large enough
# (seq_len positions) for zstd to work on one at a time.
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:3"
# u8 log-probs: anything more than this far below a position's best id is clipped; e^-60 is
# ~1e-26, far below anything a K-draw sample or a loss can see.
U8_MAX_SPREAD = 60.0
# Fields of `meta` the writer needs; any other JSON values in `meta` are kept verbatim.
REQUIRED_META = (
    "params_sha256",
    "tokenizer_fingerprint",
    "vocab_size",
    "method",
    "k",
    "temperature",
    "logprob_dtype",
    "seq_len",
)

_MAGIC = b"DXLR"
_HEADER = struct.Struct("<4sBBBBQIIII")
_SHARD_RE = re.compile(r"^shard-(\d{3})-(\d{5})\.array_record$")
_MANIFEST = "manifest.json"
_MAX_OPEN_SHARDS = 64  # open ArrayRecordReaders kept by a LogitStoreReader (LRU)


class LogitStoreMismatch(ValueError):
    """The store was made for something else (vocabulary, tokenizer, length, teacher...)."""


class LogitStoreCorrupt(ValueError):
    """A shard or record is not what the manifest says (checksum, size, header)."""


# ---------------------------------------------------------------------------------------------
# 1. Sampling (JAX)
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("method", "k", "temperature"))
def sample_targets(
    *, key: jax.Array, logits: jax.Array, method: str, k: int, temperature: float = 1.0
) -> dict[str, jax.Array]:
    """Teacher targets per position from logits [b, t, V].

    Returns ids int32, valid bool, teacher_logprobs float32, counts int32, each [b, t, n] with
    n = k ("sampled", "top_k") or V ("full"); ids sorted ascending then -1 padding (see the
    module docstring). `key` is used by "sampled" only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    *lead, vocab = logits.shape
    scaled = logits.astype(jnp.float32) / temperature
    if method != "sampled":  # the sampler needs no vocabulary-sized log-softmax
        logprobs = jax.nn.log_softmax(scaled, axis=-1)
    if method == "full":
        ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), logprobs.shape)
        valid = jnp.ones(logprobs.shape, bool)
        return dict(ids=ids, valid=valid, teacher_logprobs=logprobs, counts=jnp.zeros_like(ids))
    if method == "top_k":
        if not 1 <= k <= vocab:
            raise ValueError(f"top_k: k must be in [1, {vocab}], got {k}")
        _, ids = jax.lax.top_k(logprobs, k)
        ids = jnp.sort(ids, axis=-1)
        lp = jnp.take_along_axis(logprobs, ids, axis=-1)
        valid = jnp.ones(ids.shape, bool)
        return dict(ids=ids, valid=valid, teacher_logprobs=lp, counts=jnp.zeros_like(ids))

    if k < 1:
        raise ValueError(f"sampled: k must be >= 1, got {k}")
    draws, picked, lse = _draw_with_replacement(key, scaled.reshape(-1, vocab), k)  # [N, K]x2, [N]
    if vocab * k < 2**31:  # sort one int32 key, id * K + draw index: faster than a pair sort
        order = jnp.sort(draws * k + jnp.arange(k, dtype=jnp.int32), axis=1)
        draws, picked = order // k, jnp.take_along_axis(picked, order % k, axis=1)
    else:
        draws, picked = jax.lax.sort((draws, picked), dimension=1, num_keys=1)
    # Dedupe the sorted draws: the first occurrence of each id starts a run whose length is its
    # count. Run j goes to slot (number of runs started before it): a cumulative sum and a
    # scatter, where a second sort of the run starts used to be.
    n = draws.shape[0]
    first = jnp.concatenate([jnp.ones((n, 1), bool), draws[:, 1:] != draws[:, :-1]], axis=1)
    slot = jnp.where(first, jnp.cumsum(first, axis=1) - 1, k)  # k is out of range: dropped
    rows = jnp.arange(n)[:, None]

    def to_slots(values, fill):
        return jnp.full((n, k), fill, values.dtype).at[rows, slot].set(values, mode="drop")

    ids = to_slots(draws, -1)
    starts = to_slots(jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (n, k)), k)
    valid = ids >= 0
    next_start = jnp.concatenate([starts[:, 1:], jnp.full((n, 1), k, jnp.int32)], axis=1)
    counts = jnp.where(valid, next_start - starts, 0).astype(jnp.int32)
    lp = jnp.where(valid, to_slots(picked, 0.0) - lse[:, None], 0.0)
    out = dict(ids=ids, valid=valid, teacher_logprobs=lp, counts=counts)
    return {name: x.reshape(*lead, k) for name, x in out.items()}


def _draw_with_replacement(
    key: jax.Array, scaled: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """K ids per position from softmax(scaled) [N, V] by three-level inverse-CDF sampling;
    returns the ids and their scaled logits, each [N, K] (unsorted), and the logsumexp [N].

    jax.random.categorical(shape=(K, ...)) draws a Gumbel per (draw, vocabulary entry), K * V
    work per position. Inverse-CDF sampling is a cumulative sum plus a search per draw, but a
    float32 CDF over 262k entries cannot resolve the tail (its spacing near 1 is 6e-8, the size
    of a tail probability), and a cumulative sum over the whole vocabulary is itself the slow
    part on a CPU (it writes a vocabulary-sized array). So the vocabulary is cut into chunks of
    c ids, and chunks into groups of g chunks, c and g about V^(1/3): a group is picked from the
    CDF of group masses, a chunk from the CDF of its group's chunk masses, an id from the CDF of
    its chunk, each with its own uniform and each CDF short enough to resolve every entry. The
    only passes over the vocabulary are two reductions (the maximum, then the chunk masses
    relative to it, which also give the logsumexp); each draw then reads one row of g chunk
    masses and one chunk of c logits (row gathers), and picks within each by counting the CDF
    entries at or below its target. Masses are left unnormalised (each pick scales its uniform
    by its CDF's own total).
    """
    n, vocab = scaled.shape
    c = 1 << max(0, int(math.log2(vocab) // 3))
    n_chunks = -(-vocab // c)
    g = 1 << max(0, math.ceil(math.log2(math.sqrt(n_chunks))))
    n_groups = -(-n_chunks // g)
    x = jnp.pad(scaled, [(0, 0), (0, n_groups * g * c - vocab)], constant_values=-jnp.inf)
    x = x.reshape(n, n_groups * g, c)
    top = jax.lax.stop_gradient(jnp.max(scaled, axis=-1))[:, None, None]
    chunk_mass = jnp.exp(x - top).sum(-1).reshape(n, n_groups, g)
    within = jnp.cumsum(chunk_mass, axis=-1)  # [N, G, g]
    group_cdf = jnp.cumsum(within[..., -1], axis=-1)  # [N, G]
    lse = top[:, 0, 0] + jnp.log(group_cdf[:, -1])
    u_group, u_chunk, u_id = jax.random.uniform(key, (3, n, k), jnp.float32)
    rows = jax.vmap(lambda table, index: table[index])  # [N, R, w], [N, K] -> [N, K, w]

    def pick(cdf, u):
        """First index whose CDF (last axis, nondecreasing) exceeds u * total: the number of
        entries at or below the target. Zero-probability entries repeat the previous value, so
        they are never the first; the target stays below the total."""
        total = cdf[..., -1:]
        target = jnp.minimum(u[..., None] * total, jnp.nextafter(total, 0.0))
        return (cdf <= target).sum(-1).astype(jnp.int32)

    group = pick(group_cdf[:, None, :], u_group)  # [N, K]
    chunk = group * g + pick(rows(within, group), u_chunk)
    logits_of_chunk = rows(x, chunk)  # [N, K, c]
    # The last level counts against a sequential running sum, unrolled, never materialised
    # (XLA:CPU's cumsum is a reduce-window, c adds per entry). Sequential, not a triangular
    # matmul, whose blocked sums could put a padding entry's CDF above its chunk's last real
    # entry and so let it be drawn.
    mass = jnp.exp(logits_of_chunk - top)
    total = functools.reduce(jnp.add, (mass[..., j] for j in range(c)))
    target = jnp.minimum(u_id * total, jnp.nextafter(total, 0.0))
    running, pos = jnp.zeros_like(total), jnp.zeros(total.shape, jnp.int32)
    for j in range(c - 1):  # the last entry's running sum is the total: never <= target
        running = running + mass[..., j]
        pos = pos + (running <= target).astype(jnp.int32)
    picked = jnp.take_along_axis(logits_of_chunk, pos[..., None], axis=-1)[..., 0]
    return chunk * c + pos, picked, lse


# ---------------------------------------------------------------------------------------------
# 2. Encoding one row (numpy)
# ---------------------------------------------------------------------------------------------


def _uint_dtype(max_value: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt).newbyteorder("<")
    raise ValueError(f"value {max_value} does not fit in 32 bits")


def varint_encode(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers < 2^35, vectorised."""
    v = np.asarray(values, np.uint64)
    if v.size == 0:
        return b""
    nbytes = np.ones(v.shape, np.int64)
    for shift in (7, 14, 21, 28):
        nbytes += v >= (1 << shift)
    if np.any(v >= (1 << 35)):
        raise ValueError("varint value too large")
    offsets = np.cumsum(nbytes) - nbytes
    out = np.zeros(int(nbytes.sum()), np.uint8)
    for i in range(int(nbytes.max())):
        m = nbytes > i
        more = (nbytes[m] > i + 1).astype(np.uint64) << np.uint64(7)
        out[offsets[m] + i] = ((v[m] >> np.uint64(7 * i)) & np.uint64(0x7F)) | more
    return out.tobytes()


def varint_decode(buf: bytes | np.ndarray, count: int) -> np.ndarray:
    """Inverse of `varint_encode`; int64 [count]. Raises if the stream does not hold `count`."""
    b = np.frombuffer(buf, np.uint8) if isinstance(buf, bytes | memoryview) else buf
    ends = np.flatnonzero((b & 0x80) == 0)
    if len(ends) != count or (count and ends[-1] != len(b) - 1):
        raise LogitStoreCorrupt(f"varint stream holds {len(ends)} values, expected {count}")
    if count == 0:
        return np.zeros(0, np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    shift = (np.arange(len(b)) - np.repeat(starts, lengths)) * 7
    parts = (b & 0x7F).astype(np.int64) << shift
    return np.add.reduceat(parts, starts)


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _check_row_arrays(ids, valid, lp, counts, *, method, vocab_size, k):
    t, n_max = ids.shape
    expect = vocab_size if method == "full" else k
    if n_max != expect:
        raise ValueError(f"{method}: expected {expect} ids per position, got {n_max}")
    ns = valid.sum(axis=1)
    if not np.array_equal(valid, np.arange(n_max)[None, :] < ns[:, None]):
        raise ValueError("valid ids must come first at every position")
    if np.any(ns == 0):
        raise ValueError("every position needs at least one id")
    v_ids = ids[valid]
    if v_ids.size and (v_ids.min() < 0 or v_ids.max() >= vocab_size):
        raise ValueError(f"ids out of range [0, {vocab_size})")
    inner = valid[:, 1:]
    if np.any(ids[:, 1:][inner] <= ids[:, :-1][inner]):
        raise ValueError("ids must be strictly increasing at every position")
    if not np.all(np.isfinite(lp[valid])):
        raise ValueError("teacher log-probs must be finite at valid ids")
    if method == "sampled":
        c = counts[valid]
        if np.any(c < 1) or np.any(counts.sum(axis=1) != k):
            raise ValueError(f"sampled counts must be >= 1 and sum to K={k} per position")
    return ns


def encode_row(
    targets: Mapping[str, np.ndarray],
    *,
    row_index: int,
    vocab_size: int,
    method: str,
    k: int,
    logprob_dtype: str = "bf16",
) -> bytes:
    """One row's targets (ids/valid/teacher_logprobs/counts, each [t, n]) -> record bytes.

    Layout in the module docstring. Validates what it stores: ids sorted, unique, in range,
    valid a prefix; sampled counts sum to K.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {LOGPROB_DTYPES}, got {logprob_dtype!r}")
    ids = np.asarray(targets["ids"], np.int64)
    valid = np.asarray(targets["valid"], bool)
    lp = np.asarray(targets["teacher_logprobs"], np.float32)
    counts = np.asarray(targets["counts"], np.int64)
    if ids.ndim != 2 or not (ids.shape == valid.shape == lp.shape == counts.shape):
        raise ValueError(f"targets must all be [t, n], got ids {ids.shape}")
    t, n_max = ids.shape
    ns = _check_row_arrays(ids, valid, lp, counts, method=method, vocab_size=vocab_size, k=k)
    if method == "full" and not np.array_equal(ids, np.broadcast_to(np.arange(n_max), ids.shape)):
        raise ValueError("full: ids must be 0..V-1 at every position")

    sections = []
    if method != "full":
        sections.append((ns - 1).astype(_uint_dtype(n_max - 1)).tobytes())
    if method == "sampled":
        sections.append((counts[valid] - 1).astype(_uint_dtype(k - 1)).tobytes())
    flat_lp = lp[valid]
    if logprob_dtype == "bf16":
        sections.append(_bf16_bits(flat_lp).astype("<u2").tobytes())
    else:
        hi = np.where(valid, lp, -np.inf).max(axis=1)
        lo = np.maximum(np.where(valid, lp, np.inf).min(axis=1), hi - U8_MAX_SPREAD)
        ranges = np.stack([lo, hi], axis=1).astype("<f4")
        lo_f, hi_f = np.repeat(ranges[:, 0], ns), np.repeat(ranges[:, 1], ns)
        span = hi_f - lo_f
        scaled = np.divide(flat_lp - lo_f, span, out=np.zeros_like(span), where=span > 0)
        q = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
        sections += [ranges.tobytes(), q.tobytes()]
    id_bytes = b""
    if method != "full":
        prev = np.concatenate([np.full((t, 1), -1, np.int64), ids[:, :-1]], axis=1)
        id_bytes = varint_encode((ids - prev - 1)[valid])
    header = _HEADER.pack(
        _MAGIC,
        FORMAT_VERSION,
        METHODS.index(method),
        LOGPROB_DTYPES.index(logprob_dtype),
        0,
        row_index,
        t,
        vocab_size,
        n_max,
        len(id_bytes),
    )
    return b"".join([header, *sections, id_bytes])


def read_record_header(record: bytes) -> dict[str, Any]:
    """The fixed header of a record: row_index, seq_len, vocab_size, method, logprob_dtype..."""
    if len(record) < _HEADER.size:
        raise LogitStoreCorrupt(f"record of {len(record)} bytes is shorter than its header")
    magic, version, method, lp_dtype, _, row, t, vocab, n_max, id_len = _HEADER.unpack_from(record)
    if magic != _MAGIC:
        raise LogitStoreCorrupt(f"bad record magic {magic!r}")
    if version != FORMAT_VERSION:
        raise LogitStoreMismatch(
            f"record format_version: store has {version}, this code reads {FORMAT_VERSION}"
        )
    return dict(
        row_index=row,
        seq_len=t,
        vocab_size=vocab,
        n_max=n_max,
        method=METHODS[method],
        logprob_dtype=LOGPROB_DTYPES[lp_dtype],
        id_bytes=id_len,
    )


def decode_row(record: bytes) -> dict[str, Any]:
    """Record bytes -> dict: row_index (int) and ids/valid/teacher_logprobs/counts [t, n_max]."""
    h = read_record_header(record)
    t, n_max = h["seq_len"], h["n_max"]
    out = dict(
        ids=np.full((t, n_max), -1, np.int32),
        valid=np.zeros((t, n_max), bool),
        teacher_logprobs=np.zeros((t, n_max), np.float32),
        counts=np.zeros((t, n_max), np.int32),
    )
    _decode_into(record, h, out["ids"], out["valid"], out["teacher_logprobs"], out["counts"])
    return dict(row_index=h["row_index"], **out)


def _decode_into(record, h, ids, valid, lp, counts) -> None:
    """Decodes into preallocated [t, n_max] views that are already -1 / False / 0 / 0."""
    t, n_max, method = h["seq_len"], h["n_max"], h["method"]
    buf = memoryview(record)
    off = _HEADER.size

    def take(dtype, count):
        nonlocal off
        dtype = np.dtype(dtype)
        end = off + dtype.itemsize * count
        if end > len(buf):
            raise LogitStoreCorrupt(f"record of row {h['row_index']} is truncated")
        a = np.frombuffer(buf[off:end], dtype)
        off = end
        return a

    if method == "full":
        ns = np.full(t, n_max, np.int64)
    else:
        ns = take(_uint_dtype(n_max - 1), t).astype(np.int64) + 1
    total = int(ns.sum())
    rows = np.repeat(np.arange(t), ns)
    cols = np.arange(total) - np.repeat(np.cumsum(ns) - ns, ns)
    if method == "sampled":
        counts[rows, cols] = take(_uint_dtype(n_max - 1), total).astype(np.int32) + 1
    if h["logprob_dtype"] == "bf16":
        vals = take("<u2", total).view(ml_dtypes.bfloat16).astype(np.float32)
    else:
        ranges = take("<f4", 2 * t).reshape(t, 2)
        q = take(np.uint8, total).astype(np.float32)
        lo, hi = np.repeat(ranges[:, 0], ns), np.repeat(ranges[:, 1], ns)
        vals = lo + q * ((hi - lo) / np.float32(255.0))
    lp[rows, cols] = vals
    valid[rows, cols] = True
    if method == "full":
        ids[:] = np.arange(n_max, dtype=np.int32)
    else:
        if len(buf) - off != h["id_bytes"]:
            raise LogitStoreCorrupt(f"record of row {h['row_index']} has a bad id section length")
        gaps = varint_decode(np.frombuffer(buf[off:], np.uint8), total) + 1
        run = np.cumsum(gaps)
        # Per position, ids = running sum of (gap + 1) - 1, restarted at each position.
        before = np.repeat(run[np.cumsum(ns) - ns] - gaps[np.cumsum(ns) - ns], ns)
        flat_ids = run - before - 1
        if flat_ids.size and flat_ids.max() >= h["vocab_size"]:
            raise LogitStoreCorrupt(f"record of row {h['row_index']} decodes ids >= vocab_size")
        ids[rows, cols] = flat_ids


# ---------------------------------------------------------------------------------------------
# 3. The store on disk
# ---------------------------------------------------------------------------------------------


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _runs(rows: Sequence[int]) -> list[list[int]]:
    """[5, 6, 7, 2, 3] -> [[5, 3], [2, 2]]: (start, length) runs of consecutive rows, in order."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1][1] += 1
        else:
            runs.append([int(r), 1])
    return runs


def _unruns(runs: Iterable[Sequence[int]]) -> np.ndarray:
    parts = [np.arange(s, s + n, dtype=np.int64) for s, n in runs]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _normalize_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    missing = [f for f in REQUIRED_META if f not in meta]
    if missing:
        raise ValueError(f"logit store meta lacks {missing}")
    m = dict(meta)
    m["vocab_size"], m["k"], m["seq_len"] = int(m["vocab_size"]), int(m["k"]), int(m["seq_len"])
    m["temperature"] = float(m["temperature"])
    if m["method"] not in METHODS:
        raise ValueError(f"meta method must be one of {METHODS}, got {m['method']!r}")
    if m["logprob_dtype"] not in LOGPROB_DTYPES:
        raise ValueError(f"meta logprob_dtype must be one of {LOGPROB_DTYPES}")
    if m["method"] == "full":
        m["k"] = m["vocab_size"]
    json.dumps(m)  # extra fields must be JSON values
    return m


def _compare_meta(found: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    for field in sorted(set(found) | set(expected)):
        if found.get(field) != expected.get(field):
            raise LogitStoreMismatch(
                f"{where}: {field} is {found.get(field)!r} there but {expected.get(field)!r} here"
            )


def _index_path(directory: str, process_index: int) -> str:
    return os.path.join(directory, f"index-{process_index:03d}.json")


class LogitStoreWriter:
    """Appends encoded rows to this process's ArrayRecord shards; resumable per shard.

    A shard holds `rows_per_shard` rows in the order written (the last one fewer). It is
    written as `<name>.tmp`, closed, fsynced, checksummed, renamed to
    `shard-{process:03d}-{n:05d}.array_record`, then committed by rewriting this process's
    `index-{process:03d}.json` (atomically). A restart keeps the committed shards, deletes the
    rest (temp files, renamed but uncommitted shards) and numbers new shards after them, so
    writing the rows not in `completed_rows()` in the original order reproduces the
    uninterrupted shards byte for byte. After every process has called `close()`, process 0
    calls `write_manifest`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        process_index: int = 0,
        meta: Mapping[str, Any],
        rows_per_shard: int,
        options: str = ARRAY_RECORD_OPTIONS,
    ):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.directory = os.fspath(directory)
        self.process_index = process_index
        self.meta = _normalize_meta(meta)
        self.rows_per_shard = rows_per_shard
        self.options = options
        os.makedirs(self.directory, exist_ok=True)
        index_path = _index_path(self.directory, process_index)
        self._shards: list[dict[str, Any]] = []
        if os.path.exists(index_path):
            with open(index_path) as f:
                index = json.load(f)
            if index.get("format_version") != FORMAT_VERSION:
                raise LogitStoreMismatch(
                    f"{index_path}: format_version is {index.get('format_version')!r} there "
                    f"but {FORMAT_VERSION!r} here"
                )
            _compare_meta(index["meta"], self.meta, index_path)
            self._shards = index["shards"]
        committed = {s["file"] for s in self._shards}
        for name in os.listdir(self.directory):
            mine = name.startswith(f"shard-{process_index:03d}-")
            if mine and (name.endswith(".tmp") or name not in committed):
                os.remove(os.path.join(self.directory, name))  # half-written or uncommitted
        self._done = set(_unruns(r for s in self._shards for r in s["row_runs"]).tolist())
        self._writer: ArrayRecordWriter | None = None
        self._rows: list[int] = []
        self._record_bytes = 0

    def completed_rows(self) -> np.ndarray:
        """Sorted row indices in committed shards of every process in this directory."""
        rows = set(self._done)
        for name in os.listdir(self.directory):
            if re.fullmatch(r"index-\d{3}\.json", name) and name != os.path.basename(
                _index_path(self.directory, self.process_index)
            ):
                with open(os.path.join(self.directory, name)) as f:
                    other = json.load(f)
                rows.update(_unruns(r for s in other["shards"] for r in s["row_runs"]).tolist())
        return np.array(sorted(rows), np.int64)

    def _shard_name(self) -> str:
        return f"shard-{self.process_index:03d}-{len(self._shards):05d}.array_record"

    def write_record(self, row_index: int, record: bytes) -> None:
        """Appends one encoded row (from `encode_row` with the same row_index)."""
        row_index = int(row_index)
        if row_index in self._done or row_index in self._rows:
            raise ValueError(f"row {row_index} is already in the store")
        if read_record_header(record)["row_index"] != row_index:
            raise ValueError(f"record header does not name row {row_index}")
        if self._writer is None:
            tmp = os.path.join(self.directory, self._shard_name() + ".tmp")
            self._writer = ArrayRecordWriter(tmp, self.options)
        self._writer.write(record)
        self._rows.append(row_index)
        self._record_bytes += len(record)
        if len(self._rows) == self.rows_per_shard:
            self._seal()

    def write_batch(self, row_ids: Sequence[int], targets: Mapping[str, Any]) -> None:
        """Encodes and appends rows: targets from `sample_targets`, each [len(row_ids), t, n]."""
        m = self.meta
        arrays = {
            name: np.asarray(targets[name])
            for name in ("ids", "valid", "teacher_logprobs", "counts")
        }
        if arrays["ids"].shape[:2] != (len(row_ids), m["seq_len"]):
            raise ValueError(
                f"targets are {arrays['ids'].shape[:2]}, expected ({len(row_ids)}, {m['seq_len']})"
            )
        for i, row in enumerate(row_ids):
            record = encode_row(
                {name: a[i] for name, a in arrays.items()},
                row_index=int(row),
                vocab_size=m["vocab_size"],
                method=m["method"],
                k=m["k"],
                logprob_dtype=m["logprob_dtype"],
            )
            self.write_record(int(row), record)

    def _seal(self) -> None:
        name = self._shard_name()
        final = os.path.join(self.directory, name)
        tmp = final + ".tmp"
        self._writer.close()
        self._writer = None
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = _sha256_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(self.directory)
        self._shards.append(
            dict(
                file=name,
                process_index=self.process_index,
                sha256=sha,
                bytes=os.path.getsize(final),
                record_bytes=self._record_bytes,
                num_records=len(self._rows),
                row_runs=_runs(self._rows),
            )
        )
        self._done.update(self._rows)
        self._rows, self._record_bytes = [], 0
        index = dict(
            format_version=FORMAT_VERSION,
            meta=self.meta,
            process_index=self.process_index,
            rows_per_shard=self.rows_per_shard,
            shards=self._shards,
        )
        _write_json_atomic(_index_path(self.directory, self.process_index), index)
        # A manifest from an earlier finish no longer describes the store.
        if os.path.exists(os.path.join(self.directory, _MANIFEST)):
            try:
                os.remove(os.path.join(self.directory, _MANIFEST))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        """Seals the last, partial shard. Idempotent."""
        if self._writer is not None:
            self._seal()

    def __enter__(self) -> LogitStoreWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        # On an exception leave the temp file: the next run discards it.
        if exc_type is None:
            self.close()


def write_manifest(directory: str | os.PathLike, *, num_rows: int | None = None) -> dict:
    """Merges every process's index into `manifest.json` (atomically); returns the manifest.

    Call once, on process 0, after all writers are closed. Checks that all processes wrote
    with the same meta, that no row is stored twice and, given `num_rows`, that the rows are
    exactly 0..num_rows-1.
    """
    directory = os.fspath(directory)
    names = sorted(n for n in os.listdir(directory) if re.fullmatch(r"index-\d{3}\.json", n))
    if not names:
        raise FileNotFoundError(f"{directory}: no index-*.json, nothing was written")
    meta, shards = None, []
    for name in names:
        with open(os.path.join(directory, name)) as f:
            index = json.load(f)
        if meta is None:
            meta = index["meta"]
        _compare_meta(index["meta"], meta, os.path.join(directory, name))
        shards += index["shards"]
    rows = _unruns(r for s in shards for r in s["row_runs"])
    uniq = np.unique(rows)
    if len(uniq) != len(rows):
        raise ValueError(f"{directory}: {len(rows) - len(uniq)} rows are stored more than once")
    if num_rows is not None and not np.array_equal(uniq, np.arange(num_rows)):
        missing = np.setdiff1d(np.arange(num_rows), uniq)
        extra = np.setdiff1d(uniq, np.arange(num_rows))
        raise ValueError(
            f"{directory}: rows must be exactly 0..{num_rows - 1}; {len(missing)} missing "
            f"(first {missing[:10].tolist()}), {len(extra)} beyond (first {extra[:10].tolist()})"
        )
    for s in shards:
        path = os.path.join(directory, s["file"])
        if not os.path.exists(path) or os.path.getsize(path) != s["bytes"]:
            raise LogitStoreCorrupt(f"{path}: missing or not {s['bytes']} bytes as indexed")
    num_tokens = len(rows) * meta["seq_len"]
    total_bytes = sum(s["bytes"] for s in shards)
    record_bytes = sum(s["record_bytes"] for s in shards)
    manifest = dict(
        format_version=FORMAT_VERSION,
        **meta,
        num_rows=len(rows),
        num_tokens=num_tokens,
        bytes=total_bytes,
        bytes_per_token=total_bytes / max(num_tokens, 1),
        record_bytes_per_token=record_bytes / max(num_tokens, 1),
        shards=shards,
    )
    _write_json_atomic(os.path.join(directory, _MANIFEST), manifest)
    return manifest


class LogitStoreReader:
    """Random access to a finished store: `read_rows(row_ids)` -> arrays for the distill loss.

    verify: "lazy" checks a shard's sha256 the first time it is read, "eager" checks all
    shards now, "none" only sizes. Not thread-safe: one reader per thread or process.
    """

    def __init__(self, directory: str | os.PathLike, *, verify: str = "lazy"):
        if verify not in ("lazy", "eager", "none"):
            raise ValueError(f"verify must be lazy, eager or none, got {verify!r}")
        self.directory = os.fspath(directory)
        path = os.path.join(self.directory, _MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: the logit store was never finished (write_manifest)"
            )
        with open(path) as f:
            self.manifest = json.load(f)
        m = self.manifest
        if m.get("format_version") != FORMAT_VERSION:
            raise LogitStoreMismatch(
                f"{path}: format_version is {m.get('format_version')!r} in the store but "
                f"{FORMAT_VERSION!r} in this code"
            )
        missing = [f for f in (*REQUIRED_META, "num_rows", "shards") if f not in m]
        if missing:
            raise LogitStoreCorrupt(f"{path} lacks {missing}")
        self.meta = {f: m[f] for f in REQUIRED_META}
        self.seq_len = int(m["seq_len"])
        self.k_max = int(m["k"])  # for "full", normalised to vocab_size by the writer
        self._verify = verify
        self._shards = m["shards"]
        self._readers: collections.OrderedDict[int, ArrayRecordReader] = collections.OrderedDict()
        self._verified: set[int] = set()
        shard_of, record_of, all_rows = [], [], []
        for si, s in enumerate(self._shards):
            fp = os.path.join(self.directory, s["file"])
            if not os.path.exists(fp):
                raise LogitStoreCorrupt(f"shard {s['file']} is missing from {self.directory}")
            if os.path.getsize(fp) != s["bytes"]:
                raise LogitStoreCorrupt(
                    f"shard {s['file']} is {os.path.getsize(fp)} bytes, manifest says {s['bytes']}"
                )
            rows = _unruns(s["row_runs"])
            all_rows.append(rows)
            shard_of.append(np.full(len(rows), si, np.int64))
            record_of.append(np.arange(len(rows), dtype=np.int64))
        rows = np.concatenate(all_rows) if all_rows else np.zeros(0, np.int64)
        if len(rows) != m["num_rows"]:
            raise LogitStoreCorrupt(f"{path}: num_rows {m['num_rows']} but {len(rows)} in shards")
        self._lookup = np.full(int(rows.max()) + 1 if len(rows) else 0, -1, np.int64)
        self._lookup[rows] = np.arange(len(rows))
        self._shard_of = np.concatenate(shard_of) if shard_of else rows
        self._record_of = np.concatenate(record_of) if record_of else rows
        if verify == "eager":
            self.verify_checksums()

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    def row_ids(self) -> np.ndarray:
        return np.flatnonzero(self._lookup >= 0)

    def check_compatible(
        self,
        *,
        vocab_size: int,
        tokenizer_fingerprint: str,
        seq_len: int,
        params_sha256: str | None = None,
        method: str | None = None,
        k: int | None = None,
        temperature: float | None = None,
    ) -> None:
        """Raises LogitStoreMismatch naming the first field whose value differs (None: skip)."""
        wanted = dict(
            vocab_size=vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint,
            seq_len=seq_len,
            params_sha256=params_sha256,
            method=method,
            k=k,
            temperature=temperature,
        )
        for field, value in wanted.items():
            if value is not None and self.meta[field] != value:
                raise LogitStoreMismatch(
                    f"logit store {self.directory}: {field} is {self.meta[field]!r} in the "
                    f"store but {value!r} here"
                )

    def _shard_path(self, si: int) -> str:
        return os.path.join(self.directory, self._shards[si]["file"])

    def _check_shard(self, si: int) -> None:
        if si in self._verified:
            return
        expected = self._shards[si]["sha256"]
        found = _sha256_file(self._shard_path(si))
        if found != expected:
            raise LogitStoreCorrupt(
                f"shard {self._shards[si]['file']} in {self.directory} fails its checksum: "
                f"sha256 {found}, manifest says {expected}"
            )
        self._verified.add(si)

    def verify_checksums(self) -> None:
        for si in range(len(self._shards)):
            self._check_shard(si)

    def _reader(self, si: int) -> ArrayRecordReader:
        if si in self._readers:
            self._readers.move_to_end(si)
            return self._readers[si]
        if self._verify != "none":
            self._check_shard(si)
        if len(self._readers) >= _MAX_OPEN_SHARDS:
            self._readers.popitem(last=False)[1].close()
        # No readahead: reads are random, one record each.
        self._readers[si] = ArrayRecordReader(self._shard_path(si), "readahead_buffer_size:0")
        return self._readers[si]

    def read_rows(self, row_ids: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """ids int32, valid bool, teacher_logprobs float32, counts int32: [n, seq_len, k_max].

        Rows in the order asked (repeats allowed), from any shards.
        """
        row_ids = np.asarray(row_ids, np.int64).reshape(-1)
        bad = (row_ids < 0) | (row_ids >= len(self._lookup))
        slot = np.where(bad, -1, self._lookup[np.where(bad, 0, row_ids)])
        if np.any(slot < 0):
            raise KeyError(f"rows not in the logit store: {row_ids[slot < 0][:10].tolist()}")
        n, t, kk = len(row_ids), self.seq_len, self.k_max
        out = dict(
            ids=np.full((n, t, kk), -1, np.int32),
            valid=np.zeros((n, t, kk), bool),
            teacher_logprobs=np.zeros((n, t, kk), np.float32),
            counts=np.zeros((n, t, kk), np.int32),
        )
        shard = self._shard_of[slot]
        for si in np.unique(shard):
            where = np.flatnonzero(shard == si)
            name = self._shards[si]["file"]
            try:
                records = self._reader(int(si)).read(self._record_of[slot[where]].tolist())
            except LogitStoreCorrupt:
                raise
            except Exception as e:  # riegeli's own chunk checks, truncation...
                raise LogitStoreCorrupt(f"shard {name} in {self.directory}: {e}") from e
            for i, record in zip(where, records, strict=True):
                h = read_record_header(record)
                if h["row_index"] != row_ids[i] or h["seq_len"] != t or h["n_max"] != kk:
                    raise LogitStoreCorrupt(
                        f"shard {name}: record holds row {h['row_index']} (seq_len "
                        f"{h['seq_len']}, n_max {h['n_max']}), expected row {row_ids[i]}"
                    )
                _decode_into(
                    record,
                    h,
                    out["ids"][i],
                    out["valid"][i],
                    out["teacher_logprobs"][i],
                    out["counts"][i],
                )
        return out

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def __enter__(self) -> LogitStoreReader:
        return self

    def __exit__(self, *_) -> None:
        self.close()
