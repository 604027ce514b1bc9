"""Weight merging: average (WARM), slerp of task vectors (WARP), LITI, and the `merge` stage
end to end (two fine-tuned stages from one base, merged, checkpoint checked against numpy)."""

import copy
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tests.conftest import write_kjv_corpus
from train import merging
from train.checkpoint import params_sha256
from train.config import ConfigError, parse_config

TOL = dict(rtol=1e-6, atol=1e-6)


def tree(w, b):
    return {"layer": {"w": np.asarray(w, np.float32)}, "b": np.asarray(b, np.float32)}


# ---------------------------------------------------------------------------------------------
# average


def test_average_weighted_matches_numpy():
    rng = np.random.default_rng(0)
    trees = [tree(rng.normal(size=(3, 4)), rng.normal(size=(4,))) for _ in range(3)]
    out = merging.average(trees=trees, weights=[1.0, 2.0, 5.0])
    w = np.array([1, 2, 5]) / 8
    for get in (lambda t: t["layer"]["w"], lambda t: t["b"]):
        want = sum(wi * get(t) for wi, t in zip(w, trees, strict=True))
        np.testing.assert_allclose(get(out), want, **TOL)
    assert isinstance(out["b"], np.ndarray) and out["b"].dtype == np.float32


def test_average_default_is_uniform_and_keeps_jax_and_bf16():
    a = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
    b = {"w": jnp.asarray([3.0, 5.0], jnp.bfloat16)}
    out = merging.average(trees=[a, b])
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [2.0, 3.5])
    with pytest.raises(ValueError, match="weights"):
        merging.average(trees=[a, b], weights=[1.0])
    with pytest.raises(ValueError, match="weights"):
        merging.average(trees=[a, b], weights=[1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# slerp


def vec(*x):
    return {"w": np.asarray(x, np.float32)}


def test_slerp_orthogonal_unit_vectors():
    base = vec(10.0, -3.0)  # the task vectors are what is interpolated, not the weights
    a, b = vec(11.0, -3.0), vec(10.0, -2.0)  # deltas [1, 0] and [0, 1]
    out = merging.slerp(base=base, a=a, b=b, t=0.5)
    c = math.cos(math.pi / 4)
    np.testing.assert_allclose(out["w"], [10.0 + c, -3.0 + c], **TOL)
    out = merging.slerp(base=base, a=a, b=b, t=1 / 3)  # 30 degrees from a
    np.testing.assert_allclose(
        out["w"], [10.0 + math.cos(math.pi / 6), -3.0 + math.sin(math.pi / 6)], **TOL
    )
    np.testing.assert_allclose(merging.slerp(base=base, a=a, b=b, t=0.0)["w"], a["w"], **TOL)
    np.testing.assert_allclose(merging.slerp(base=base, a=a, b=b, t=1.0)["w"], b["w"], **TOL)


def test_slerp_formula_is_applied_to_unnormalised_task_vectors():
    base = vec(0.0, 0.0)
    out = merging.slerp(base=base, a=vec(2.0, 0.0), b=vec(0.0, 1.0), t=0.5)
    c = math.cos(math.pi / 4)  # sin(W/2) / sin W with W = 90 degrees
    np.testing.assert_allclose(out["w"], [2.0 * c, c], **TOL)


@pytest.mark.parametrize("scale", [2.0, -1.0, 0.0])
def test_slerp_parallel_antiparallel_or_zero_falls_back_to_lerp(scale):
    base = vec(1.0, 1.0, 1.0)
    d = np.array([1.0, 2.0, -0.5], np.float32)
    a, b = {"w": base["w"] + d}, {"w": base["w"] + scale * d}
    out = merging.slerp(base=base, a=a, b=b, t=0.25)
    assert np.isfinite(out["w"]).all()
    np.testing.assert_allclose(out["w"], base["w"] + 0.75 * d + 0.25 * scale * d, **TOL)


def test_slerp_per_tensor_vs_global():
    # leaf x: deltas [1, 0] and [0, 1] (90 degrees); leaf y: both [1] (parallel).
    base = {"x": np.zeros(2, np.float32), "y": np.zeros(1, np.float32)}
    a = {"x": np.array([1.0, 0.0], np.float32), "y": np.array([1.0], np.float32)}
    b = {"x": np.array([0.0, 1.0], np.float32), "y": np.array([1.0], np.float32)}
    per = merging.slerp(base=base, a=a, b=b, t=0.5, per_tensor=True)
    c = math.cos(math.pi / 4)
    np.testing.assert_allclose(per["x"], [c, c], **TOL)
    np.testing.assert_allclose(per["y"], [1.0], **TOL)  # parallel: lerp
    # global: [1, 0, 1] vs [0, 1, 1], cos = 1/2, W = 60 degrees, both coefficients 1/sqrt(3)
    glob = merging.slerp(base=base, a=a, b=b, t=0.5, per_tensor=False)
    k = math.sin(math.pi / 6) / math.sin(math.pi / 3)
    np.testing.assert_allclose(glob["x"], [k, k], **TOL)
    np.testing.assert_allclose(glob["y"], [2 * k], **TOL)


def test_slerp_keeps_dtype():
    base = {"w": jnp.zeros((2,), jnp.bfloat16), "v": np.zeros((2,), np.float32)}
    a = {"w": jnp.asarray([1.0, 0.0], jnp.bfloat16), "v": np.asarray([1.0, 0.0], np.float32)}
    b = {"w": jnp.asarray([0.0, 1.0], jnp.bfloat16), "v": np.asarray([0.0, 1.0], np.float32)}
    out = merging.slerp(base=base, a=a, b=b, t=0.5)
    assert out["w"].dtype == jnp.bfloat16 and isinstance(out["v"], np.ndarray)
    want = np.float32(math.cos(math.pi / 4)).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [want, want])


def test_slerp_many_is_symmetric_and_matches_slerp_for_two():
    base = vec(0.0, 0.0, 0.0)
    units = [vec(*row) for row in np.eye(3)]
    out = merging.slerp_many(base=base, trees=units)
    np.testing.assert_allclose(out["w"], np.full(3, 1 / math.sqrt(3)), **TOL)
    rev = merging.slerp_many(base=base, trees=units[::-1])
    np.testing.assert_allclose(rev["w"], out["w"], **TOL)
    rng = np.random.default_rng(1)
    b0, x, y = (tree(rng.normal(size=(2, 3)), rng.normal(size=(3,))) for _ in range(3))
    two = merging.slerp_many(base=b0, trees=[x, y])
    one = merging.slerp(base=b0, a=x, b=y, t=0.5)
    np.testing.assert_allclose(two["layer"]["w"], one["layer"]["w"], **TOL)
    np.testing.assert_allclose(two["b"], one["b"], **TOL)
    with pytest.raises(ValueError, match="at least 2"):
        merging.slerp_many(base=base, trees=units[:1])


# ---------------------------------------------------------------------------------------------
# liti, structure


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_liti(eta):
    base, merged = vec(1.0, -2.0), vec(3.0, 2.0)
    out = merging.liti(base=base, merged=merged, eta=eta)
    np.testing.assert_allclose(out["w"], [1.0 + 2.0 * eta, -2.0 + 4.0 * eta], **TOL)


def test_structure_mismatch_names_tree_and_leaf():
    a = tree(np.zeros((2, 3)), np.zeros(3))
    b = tree(np.zeros((3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match=r"rm_b: leaf \['layer'\]\['w'\] has shape \(3, 3\)"):
        merging.check_same_structure([a, b], ["rm_a", "rm_b"])
    c = {**a, "score_head": {"w": np.zeros(3, np.float32)}}
    with pytest.raises(ValueError, match=r"trees\[1\]: leaf \['score_head'\]\['w'\] is not in"):
        merging.average(trees=[a, c])
    with pytest.raises(ValueError, match=r"a: leaf \['b'\] is missing"):
        merging.slerp(base=a, a={"layer": a["layer"]}, b=a, t=0.5)
    d = {"layer": {"w": a["layer"]["w"].astype(np.float16)}, "b": a["b"]}
    with pytest.raises(ValueError, match=r"leaf \['layer'\]\['w'\] has dtype float16"):
        merging.average(trees=[a, d])


# ---------------------------------------------------------------------------------------------
# the merge stage


TINY = {
    "preset": "gemma3-tiny",
    "num_layers": 2,
    "layer_pattern": ["local", "global"],
    "sliding_window": 8,
    "d_model": 32,
    "num_heads": 2,
    "num_kv_heads": 1,
    "head_dim": 16,
    "ffw_dim": 64,
}


def pipeline_raw(workdir: Path, name: str) -> dict:
    corpus = {"text": str(workdir / "corpus.txt")}
    data = {"corpus": corpus, "seq_len": 32, "batch_size": 8, "max_rows": 16}
    train = lambda **kw: {  # noqa: E731
        "kind": "pretrain",
        "model": "m",
        "data": data,
        "optim": {"warmup_steps": 0, "lr": 1e-2},
        "steps": 2,
        "eval": {"every": 0, "batches": 1},
        **kw,
    }
    return {
        "run": {"name": name, "dir": str(workdir / "runs"), "seed": 0},
        "logging": {"wandb": "disabled", "every": 1},
        "tokenizer": {"kind": "bpe", "train_on": corpus, "vocab_size": 300},
        "models": {"m": TINY, "m2": dict(TINY)},
        "stages": {
            "base": train(),
            "a": train(init={"stage": "base"}, optim={"warmup_steps": 0, "lr": 3e-2}),
            "b": train(init={"stage": "base"}, model="m2", steps=3),
            "avg": {"kind": "merge", "model": "m", "sources": ["a", "b"], "weights": [1, 3]},
            "warp": {
                "kind": "merge",
                "model": "m",
                "sources": ["a", "b"],
                "method": "slerp",
                "base": "base",
                "liti": 0.5,
            },
        },
    }


def test_merge_config_validation():
    raw = pipeline_raw(Path("/nonexistent"), "v")
    parse_config(raw, num_devices=8)  # the valid one

    def fails(change, *expected):
        bad = copy.deepcopy(raw)
        change(bad)
        with pytest.raises(ConfigError) as e:
            parse_config(bad, source="x.yaml", num_devices=8)
        for text in expected:
            assert text in str(e.value), str(e.value)

    def other_arch(r):
        r["models"]["m2"]["d_model"] = 64

    fails(other_arch, "stages.avg.sources.1: stage 'b'", "models.m2", "d_model: 64 vs 32")
    fails(lambda r: r["stages"]["avg"].update(weights=[1]), "weights has 1 entries for 2")
    fails(lambda r: r["stages"]["warp"].pop("base"), "base is required")
    fails(lambda r: r["stages"]["warp"].update(sources=["a"]), "needs at least 2 sources")
    fails(lambda r: r["stages"]["warp"].update(liti=1.5), "stages.warp.liti")
    fails(lambda r: r["stages"]["avg"].update(sources=["a", "nope"]), "sources.1: unknown stage")
    raw["stages"]["ev"] = {"kind": "evaluate", "checkpoint": "base"}
    fails(lambda r: r["stages"]["avg"].update(sources=["a", "ev"]), "stage 'ev' (evaluate)")


@pytest.mark.slow
def test_merge_stage_end_to_end(tmp_path):
    from train.loop import abstract_params, load_params
    from train.mesh import make_mesh
    from train.pipeline import run_pipeline

    write_kjv_corpus(tmp_path, 20)
    cfg = parse_config(pipeline_raw(tmp_path, "merge"), num_devices=8)
    assert run_pipeline(cfg, log=lambda *_: None) == 0

    manifest = json.loads((cfg.run_dir / "manifest.json").read_text())["stages"]
    assert all(manifest[s]["status"] == "done" for s in cfg.order), manifest
    mesh = make_mesh(cfg.mesh)
    _, abstract, _ = abstract_params(cfg.models["m"], mesh=mesh, rules=cfg.mesh.logical_rules())
    load = lambda s: jax_tree_np(  # noqa: E731
        load_params(manifest[s]["final_checkpoint"], abstract=abstract)
    )
    base, a, b, avg, warp = (load(s) for s in ("base", "a", "b", "avg", "warp"))

    # average with weights [1, 3]: exactly the numpy mean
    flat = lambda t: dict(enumerate(jax.tree.leaves(t)))  # noqa: E731
    fa, fb, favg = flat(a), flat(b), flat(avg)
    assert any(not np.array_equal(fa[k], fb[k]) for k in fa)  # the sources differ
    for k in fa:
        np.testing.assert_allclose(favg[k], 0.25 * fa[k] + 0.75 * fb[k], rtol=1e-6, atol=1e-7)
    # slerp + liti 0.5 agree with the library on the host copies
    want = merging.liti(base=base, merged=merging.slerp(base=base, a=a, b=b, t=0.5), eta=0.5)
    fw, fwant = flat(warp), flat(want)
    for k in fw:
        np.testing.assert_allclose(fw[k], fwant[k], rtol=1e-5, atol=1e-6)

    assert manifest["avg"]["params_sha256"] == params_sha256(avg)
    m = manifest["warp"]["metrics"]
    assert m["task_norm/a"] > 0 and m["task_norm/b"] > 0 and -1 <= m["task_cos/a/b"] <= 1
    assert manifest["avg"]["metrics"]["param_dist/a/b"] > 0

    # a rerun of a merge stage whose checkpoint already exists redoes it
    from recipes import merge
    from train.loop import StopFlag
    from train.pipeline import Manifest, StageContext

    ctx = StageContext(
        pipeline=cfg, name="avg", manifest=Manifest(cfg.run_dir / "manifest.json"), stop=StopFlag()
    )
    again = merge.run(cfg.stages["avg"], ctx)
    assert again.params_sha256 == manifest["avg"]["params_sha256"]


def jax_tree_np(t):
    return jax.tree.map(np.asarray, t)
