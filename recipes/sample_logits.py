"""sample_logits: run a teacher over the packed training rows and store its targets (Gemma 3).

    stages:
      logits:
        kind: sample_logits
        teacher: teacher               # a training stage: its final checkpoint and model
        data: {corpus: kjv, seq_len: 128, batch_size: 32, max_rows: 2400}
        method: sampled                # sampled (K draws) | top_k | full
        k: 256
        temperature: 1.0
        logprob_dtype: bf16            # or u8

One record per packed row of the train split (`data/logit_store.py`), written in ArrayRecord
shards with a manifest (teacher fingerprint, tokenizer fingerprint, vocabulary, method, K,
temperature, checksums) that the distill stage checks before use. Each row draws with its own
key (the run seed folded with the row index), so a run killed at any moment and restarted
writes the same bytes: finished shards are kept and only the missing rows are recomputed.
"""

from __future__ import annotations

from typing import Literal

import jax
import numpy as np
from flax import nnx
from pydantic import Field

from data import logit_store
from data.corpus import load_documents
from data.pipeline import packed_rows
from train.config import DataConfig, StageConfig
from train.loop import put_batch
from train.mesh import batch_sharding
from train.metrics import Throughput
from train.pipeline import StageResult


class Config(StageConfig):
    kind: Literal["sample_logits"]
    teacher: str
    """the training stage whose final checkpoint is the teacher"""
    data: DataConfig = DataConfig()
    method: Literal["sampled", "top_k", "full"] = "sampled"
    k: int = Field(256, ge=1)
    """draws per position (sampled) or ids kept (top_k)"""
    temperature: float = Field(1.0, gt=0)
    logprob_dtype: Literal["bf16", "u8"] = "bf16"
    rows_per_shard: int = Field(256, ge=1)
    teacher_dtype: Literal["float32", "bfloat16"] | None = None
    """run the teacher in this dtype (default: its own)"""
    overlap: bool | None = None
    """encode and write batch b - 1 while batch b runs on the device (default: on GPUs and
    TPUs; not on a CPU backend, where the host work would take cores from XLA)"""

    def references(self) -> dict[str, str]:
        return {"teacher": self.teacher}

    def check(self, *, name, stages, models) -> list[str]:
        t = stages.get(self.teacher)
        if t is not None and not hasattr(t, "model"):
            return [f"teacher: stage {self.teacher!r} ({t.kind}) has no model to sample from"]
        return []


def make_teacher_targets(graphdef, *, method: str, k: int, temperature: float, key):
    """jit(params, batch) -> targets [b, t, n] for the batch's rows (row r draws with key
    folded with r, so the bytes do not depend on batching or restarts)."""
    draw = jax.vmap(
        lambda kr, lg: logit_store.sample_targets(
            key=kr, logits=lg, method=method, k=k, temperature=temperature
        )
    )

    @jax.jit
    def teacher_targets(params, batch):
        teacher = nnx.merge(graphdef, params)
        logits = teacher(
            batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["row_ids"])
        targets = draw(keys, logits[:, None])
        return {n: x[:, 0] for n, x in targets.items()}

    return teacher_targets


def default_overlap() -> bool:
    """`overlap` when the config leaves it unset: on accelerators, not on a CPU backend."""
    return jax.default_backend() != "cpu"


def store_dir(ctx, stage: str):
    return ctx.run_dir / stage / "logits"


def run(cfg: Config, ctx) -> StageResult:
    # ---- setup
    tokenizer = ctx.tokenizer()
    mesh = ctx.mesh
    graphdef, params, shardings = ctx.trained_params(cfg.teacher, dtype=cfg.teacher_dtype)
    vocab = ctx.pipeline.stage_model(cfg.teacher).vocab_size
    docs = load_documents(
        cfg.data.corpus, split="train", heldout_fraction=cfg.data.heldout_fraction
    )
    rows = packed_rows(
        docs=docs,
        tokenizer=tokenizer,
        seq_len=cfg.data.seq_len,
        cache_dir=ctx.run_dir / "cache",
        max_rows=cfg.data.max_rows,
    )
    num_rows = rows.num_real_rows
    out_dir = store_dir(ctx, ctx.name)
    meta = dict(
        params_sha256=ctx.artifact(cfg.teacher)["params_sha256"],
        tokenizer_fingerprint=tokenizer.fingerprint(),
        vocab_size=vocab,
        method=cfg.method,
        k=cfg.k,
        temperature=cfg.temperature,
        logprob_dtype=cfg.logprob_dtype,
        seq_len=cfg.data.seq_len,
        corpus=cfg.data.corpus,
        heldout_fraction=cfg.data.heldout_fraction,
        max_rows=cfg.data.max_rows,
    )
    writer = logit_store.LogitStoreWriter(
        out_dir, process_index=jax.process_index(), meta=meta, rows_per_shard=cfg.rows_per_shard
    )
    done = set(writer.completed_rows().tolist())

    on_batch = batch_sharding(mesh)
    teacher_targets = make_teacher_targets(
        graphdef,
        method=cfg.method,
        k=cfg.k,
        temperature=cfg.temperature,
        key=jax.random.fold_in(jax.random.key(ctx.seed), 0x5A4D),
    )

    # ---- loop over global batches of rows; each process feeds and writes its own share
    global_b = cfg.data.batch_size
    procs, me = jax.process_count(), jax.process_index()
    local_b = global_b // procs
    num_batches = -(-num_rows // global_b)
    logger = ctx.logger(total_steps=num_batches, start_step=0)
    throughput = Throughput()
    # With `overlap` (default on an accelerator), one batch is in flight: batch b's forward +
    # sampling is dispatched (asynchronously) before batch b - 1's targets are fetched, encoded
    # and written, so the host work overlaps the device's. Not on a CPU backend, where both
    # would share the same cores and the encoding stalls XLA's threads (measured in
    # bench/distill.py: 855 ms per batch overlapped against ~775 ms in turn).
    # Whatever is in flight is written before the stage returns, also on a stop.
    overlap = cfg.overlap if cfg.overlap is not None else default_overlap()
    pending = None

    def write(item) -> None:
        b, ids, mine, row_ids, on_device = item
        targets = jax.device_get(on_device)
        if procs > 1:
            targets = {n: x[me * local_b : (me + 1) * local_b] for n, x in targets.items()}
        keep = [i for i, r in enumerate(mine) if r < num_rows and int(r) not in done]
        writer.write_batch(row_ids[keep], {n: x[keep] for n, x in targets.items()})
        throughput.tick(tokens=len(ids) * cfg.data.seq_len)
        if (b + 1) % ctx.pipeline.logging.every == 0 or b + 1 == num_batches:
            rows_done = int(min((b + 1) * global_b, num_rows))
            logger.log(b + 1, {"rows": rows_done, **throughput.rates()})
        else:
            logger.advance(b + 1)

    for b in range(num_batches):
        ids = np.arange(b * global_b, (b + 1) * global_b)
        mine = ids[me * local_b : (me + 1) * local_b]
        if all(int(r) in done or r >= num_rows for r in ids):
            if pending is None:
                logger.advance(b + 1)
            continue
        row_ids = np.minimum(mine, num_rows - 1)  # pad the last batch with a repeated row
        batch = rows.rows(row_ids)
        batch["row_ids"] = row_ids.astype(np.int32)
        on_device = teacher_targets(params, put_batch(batch, on_batch))
        if pending is not None:
            write(pending)
        pending = (b, ids, mine, row_ids, on_device)
        if not overlap:
            write(pending)
            pending = None
        if ctx.stop.requested and b + 1 < num_batches:
            if pending is not None:
                write(pending)
            writer.close()  # seals the open shard: its rows count as done on restart
            logger.close()
            return StageResult(status="interrupted", step=b + 1)
    if pending is not None:
        write(pending)
    writer.close()

    # ---- end: process 0 merges the per-process indexes into the manifest
    if procs > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sample_logits:written")
    manifest = logit_store.write_manifest(out_dir, num_rows=num_rows) if me == 0 else {}
    metrics = {
        "rows": num_rows,
        "tokens": int(manifest.get("num_tokens", 0)),
        "bytes_per_token": float(manifest.get("bytes_per_token", 0.0)),
        "record_bytes_per_token": float(manifest.get("record_bytes_per_token", 0.0)),
    }
    logger.log(num_batches, metrics, kind="eval")
    logger.close()
    return StageResult(
        status="done", step=num_batches, metrics=metrics, outputs={"logits": str(out_dir)}
    )
