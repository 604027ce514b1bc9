"""The distillation pipeline end to end: teacher -> sample_logits -> distill (+ evaluate),
the store's refusal of a mismatched student, config checks, and exact resume of both stages."""

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import launch
from data.logit_store import LogitStoreReader
from tests.conftest import write_kjv_corpus
from tests.test_resume import launch as launch_process
from tests.test_resume import wait_for_checkpoint
from train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_kjv_corpus(tmp_path_factory.mktemp("distill"), 40)


def pipeline(workdir: Path, name: str, **changes) -> Path:
    corpus = {"text": str(workdir / "corpus.txt")}
    data = {"corpus": corpus, "seq_len": 32, "batch_size": 8, "max_rows": 96}
    tiny = {
        "preset": "gemma3-tiny",
        "num_layers": 2,
        "layer_pattern": ["local", "global"],
        "sliding_window": 8,
        "num_heads": 2,
        "num_kv_heads": 1,
        "head_dim": 16,
    }
    cfg = {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 5},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {
            "teacher": {**tiny, "d_model": 64, "ffw_dim": 128},
            "student": {**tiny, "d_model": 32, "ffw_dim": 64},
        },
        "stages": {
            "teacher": {
                "kind": "pretrain",
                "model": "teacher",
                "steps": 40,
                "data": {**data, "max_rows": None},
                "optim": {"warmup_steps": 5},
                "eval": {"batches": 2},
            },
            "logits": {
                "kind": "sample_logits",
                "teacher": "teacher",
                "k": 64,
                "data": {**data, "batch_size": 16},
                "rows_per_shard": 16,
            },
            "student": {
                "kind": "distill",
                "model": "student",
                "logits": "logits",
                "steps": 24,
                "data": data,
                "optim": {"warmup_steps": 4},
                "eval": {"batches": 2},
                "checkpoint": {"every": 4, "keep": 2},
            },
            "eval_student": {
                "kind": "evaluate",
                "checkpoint": "student",
                "teacher": "teacher",
                "data": data,
                "batches": 2,
            },
        },
    }
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def offline_run(corpus):
    config = pipeline(corpus, "offline")
    rc, out = launch_process(config)
    assert rc == 0, out
    return corpus / "runs/offline", json.loads((corpus / "runs/offline/manifest.json").read_text())


def test_store_manifest_names_the_teacher_and_tokenizer(offline_run):
    run_dir, manifest = offline_run
    store = LogitStoreReader(manifest["stages"]["logits"]["outputs"]["logits"])
    meta = store.manifest
    assert meta["params_sha256"] == manifest["stages"]["teacher"]["params_sha256"]
    assert meta["method"] == "sampled" and meta["k"] == 64 and meta["vocab_size"] == 300
    assert store.manifest["num_rows"] == 96
    rows = store.read_rows(np.array([95, 0, 7]))
    assert rows["ids"].shape == (3, 32, 64)
    assert (rows["counts"].sum(-1) == 64).all()  # every position holds its 64 draws


def test_distilled_student_learns_the_teacher(offline_run):
    run_dir, manifest = offline_run
    train = [r for r in read_metrics(run_dir / "student/metrics.jsonl") if r["kind"] == "train"]
    assert train[-1]["kl_to_teacher"] < 0.8 * train[0]["kl_to_teacher"]
    st = manifest["stages"]["student"]
    assert st["status"] == "done" and st["metrics"]["kl_to_teacher"] > 0
    ev = manifest["stages"]["eval_student"]["metrics"]
    assert ev["kl_to_teacher"] > 0 and ev["eval_ppl"] > 1


@pytest.mark.slow
def test_kill_during_sampling_and_distillation_then_resume_is_exact(offline_run, corpus):
    """SIGKILL once while the store is written and once while the student trains: the shards
    are byte-identical and the student ends with the same params_sha256."""
    config = pipeline(corpus, "killed")
    run_dir = corpus / "runs/killed"
    proc = launch_process(config, wait=False)
    shards = run_dir / "logits/logits"
    end = time.time() + 300
    while not list(shards.glob("shard-*.array_record")) and time.time() < end:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = launch_process(config, wait=False)
    wait_for_checkpoint(run_dir, proc, at_least=8, stage="student")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rc, out = launch_process(config)
    assert rc == 0, out
    ref_dir, ref = offline_run
    got = json.loads((run_dir / "manifest.json").read_text())
    sums = lambda d: [
        s["sha256"] for s in json.loads((d / "logits/logits/manifest.json").read_text())["shards"]
    ]
    assert sums(run_dir) == sums(ref_dir)
    assert got["stages"]["student"]["params_sha256"] == ref["stages"]["student"]["params_sha256"]


def test_overlapped_sampling_writes_the_same_store(offline_run, corpus):
    """overlap: true (the accelerator default: encode batch b - 1 while batch b runs) gives a
    byte-identical store."""
    rc, out = launch_process(pipeline(corpus, "overlap", **{"stages.logits.overlap": True}))
    assert rc == 0, out
    sums = lambda d: [
        s["sha256"] for s in json.loads((d / "logits/logits/manifest.json").read_text())["shards"]
    ]
    ref_dir, _ = offline_run
    assert sums(corpus / "runs/overlap") == sums(ref_dir)


def test_store_refuses_a_mismatched_student(offline_run, corpus):
    import shutil

    run_dir, manifest = offline_run
    store_manifest = Path(manifest["stages"]["logits"]["outputs"]["logits"]) / "manifest.json"
    original = store_manifest.read_text()
    data = json.loads(original)
    data["tokenizer_fingerprint"] = "0" * 64  # as if written under another tokenizer
    store_manifest.write_text(json.dumps(data))
    run_manifest = json.loads((run_dir / "manifest.json").read_text())
    run_manifest["stages"]["student"]["status"] = "pending"  # make the student run again
    (run_dir / "manifest.json").write_text(json.dumps(run_manifest))
    shutil.rmtree(run_dir / "student")
    try:
        rc, out = launch_process(pipeline(corpus, "offline"))
        assert rc != 0
        assert "tokenizer_fingerprint" in out
        ckpts = run_dir / "student/checkpoints"
        assert not ckpts.exists() or not any(ckpts.iterdir())  # stopped before the first step
    finally:
        store_manifest.write_text(original)


def test_student_vocab_must_match_the_teacher(corpus, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = launch.main([str(pipeline(corpus, "vocab", **{"models.student.vocab_size": 320}))])
    err = capsys.readouterr().err
    assert rc == 2 and "stages.student.model: the student's vocab_size 320 differs" in err


@pytest.mark.parametrize(
    "change,expect",
    [
        (
            {"stages.student.data.seq_len": 16},
            "stages.student.data.seq_len: 16 differs from the logit store's",
        ),
        (
            {"stages.student.loss": {"kind": "full_kl"}},
            "stages.student.loss.kind: 'full_kl' cannot use 'sampled' targets",
        ),
        (
            {"stages.student.teacher": "teacher"},
            "set exactly one of logits (offline) or teacher (online)",
        ),
        ({"stages.logits.teacher": "logits"}, "cannot depend on itself"),
    ],
)
def test_distill_config_checks(corpus, change, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = launch.main([str(pipeline(corpus, "bad", **change))])
    err = capsys.readouterr().err
    assert rc == 2 and expect in err, err


@pytest.mark.parametrize(
    "loss", [{"kind": "full_kl", "alpha": 0.5, "temperature": 2.0}, {"kind": "sampled_ce"}]
)
def test_online_distillation_runs_the_teacher_in_the_step(corpus, loss):
    data = {"corpus": {"text": str(corpus / "corpus.txt")}, "seq_len": 32, "batch_size": 8}
    online = {
        "kind": "distill",
        "model": "student",
        "teacher": "teacher",
        "loss": loss,
        "steps": 12,
        "data": data,
        "optim": {"warmup_steps": 2},
        "eval": {"batches": 2},
        "online_k": 32,
    }
    name = f"online-{loss['kind']}"
    config = pipeline(
        corpus,
        name,
        **{
            "stages.logits": None,
            "stages.student": None,
            "stages.eval_student": None,
            "stages.online": online,
        },
    )
    rc, out = launch_process(config)
    assert rc == 0, out
    train = [
        r
        for r in read_metrics(corpus / "runs" / name / "online/metrics.jsonl")
        if r["kind"] == "train"
    ]
    assert train[-1]["kl_to_teacher"] < train[0]["kl_to_teacher"]


def test_stored_targets_are_the_teachers_log_probs_at_each_rows_tokens(offline_run):
    """Row alignment end to end: re-run the teacher on packed rows and compare with the store."""
    import jax

    from data.corpus import load_documents as docs_of
    from data.pipeline import packed_rows
    from data.tokenizer import load_tokenizer
    from train.config import load_config
    from train.loop import abstract_params, load_params
    from train.mesh import MeshConfig, make_mesh

    run_dir, manifest = offline_run
    cfg = load_config(run_dir.parent.parent / "offline.yaml", ["mesh.data=-1"])
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    graphdef, abstract, _ = abstract_params(cfg.models["teacher"], mesh=mesh, rules={})
    params = load_params(manifest["stages"]["teacher"]["final_checkpoint"], abstract=abstract)
    from flax import nnx

    teacher = nnx.merge(graphdef, params)
    t = cfg.tokenizer
    tok = load_tokenizer(
        kind=t.kind,
        vocab_size=t.vocab_size,
        train_on=t.train_on,
        cache_dir=str(run_dir / "tokenizer"),
    )
    data = cfg.stages["logits"].data
    rows = packed_rows(
        docs=docs_of(data.corpus, split="train"),
        tokenizer=tok,
        seq_len=data.seq_len,
        cache_dir=run_dir / "cache",
        max_rows=data.max_rows,
    )
    ids = np.array([3, 50, 95])
    batch = rows.rows(ids)
    logp = jax.nn.log_softmax(
        teacher(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"]),
        axis=-1,
    )
    stored = LogitStoreReader(manifest["stages"]["logits"]["outputs"]["logits"]).read_rows(ids)
    got = np.take_along_axis(np.asarray(logp), np.maximum(stored["ids"], 0), axis=-1)
    valid = stored["valid"]
    np.testing.assert_allclose(stored["teacher_logprobs"][valid], got[valid], atol=0.05, rtol=0.01)
