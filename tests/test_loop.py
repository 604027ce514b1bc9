"""The shared training step: gradient accumulation, the non-finite guard, schedules, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recipes.pretrain import lm_loss
from train.config import InitConfig, OptimConfig
from train.loop import init_params, make_train_step
from train.mesh import MeshConfig, batch_sharding, like_params_shardings, make_mesh
from train.models.config import ModelConfig
from train.optim import build_optimizer, learning_rate_schedule

CFG = ModelConfig(
    family="gemma3",
    vocab_size=64,
    num_layers=2,
    d_model=16,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    ffw_dim=32,
    layer_pattern=("local", "global"),
    sliding_window=4,
    scan_layers=False,
)


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh(MeshConfig(data=-1), devices=jax.devices()[:2])
    rules = MeshConfig().logical_rules()
    graphdef, params, shardings = init_params(
        model_cfg=CFG, init=InitConfig(), mesh=mesh, rules=rules, seed=0
    )
    return mesh, graphdef, params, shardings


def batch(seed=0, rows=8, seq=12):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 64, (rows, seq + 1)).astype(np.int32)
    mask = (rng.random((rows, seq)) > 0.2).astype(np.float32)  # uneven token counts per row
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": mask,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
        "segment_ids": np.ones((rows, seq), np.int32),
    }


def one_step(setup, *, accum, loss_fn=lm_loss, b=None):
    mesh, graphdef, params, shardings = setup
    params = jax.tree.map(jnp.copy, params)  # the step donates its inputs
    tx = build_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), total_steps=10)
    opt_sh = like_params_shardings(
        jax.eval_shape(tx.init, params), params=params, shardings=shardings
    )
    opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
    step = make_train_step(
        graphdef=graphdef,
        tx=tx,
        loss_fn=loss_fn,
        grad_accum=accum,
        param_shardings=shardings,
        opt_shardings=opt_sh,
        batch_sharding=batch_sharding(mesh),
        rng=jax.random.key(0),
    )
    return step(params, opt, b or batch(), 0, None)


def test_gradient_accumulation_equals_the_whole_batch(setup):
    p1, _, m1 = one_step(setup, accum=1)
    p4, _, m4 = one_step(setup, accum=4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_non_finite_update_is_dropped(setup):
    def nan_loss(model, b, rng, extra):
        s, sums = lm_loss(model, b, rng, extra)
        return s * jnp.nan, {**sums, "loss": s * jnp.nan}

    _, _, before, _ = setup
    params, _, metrics = one_step(setup, accum=1, loss_fn=nan_loss)
    assert float(metrics["nonfinite"]) == 1.0
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    _, _, ok = one_step(setup, accum=1)
    assert float(ok["nonfinite"]) == 0.0


def test_schedules():
    cos = learning_rate_schedule(
        OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1), total_steps=110
    )
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.5)
    assert float(cos(10)) == pytest.approx(1.0) and float(cos(110)) == pytest.approx(0.1)
    lin = learning_rate_schedule(
        OptimConfig(lr=1.0, warmup_steps=0, schedule="linear", min_lr_ratio=0.0), total_steps=100
    )
    assert float(lin(50)) == pytest.approx(0.5)
    const = learning_rate_schedule(
        OptimConfig(lr=0.3, warmup_steps=0, schedule="constant"), total_steps=5
    )
    assert float(const(4)) == pytest.approx(0.3)


def test_init_from_hf_checkpoint(setup, tmp_path):
    from train.models.gemma import Transformer
    from train.models.hf import save_hf

    mesh, _, _, _ = setup
    model = Transformer(CFG, rngs=nnx.Rngs(3))
    save_hf(model, tmp_path)
    rules = MeshConfig().logical_rules()
    _, params, _ = init_params(
        model_cfg=CFG, init=InitConfig(hf=str(tmp_path)), mesh=mesh, rules=rules, seed=0
    )
    want = nnx.state(model, nnx.Param).to_pure_dict()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="d_model"):
        init_params(
            model_cfg=CFG.model_copy(update={"d_model": 24}),
            init=InitConfig(hf=str(tmp_path)),
            mesh=mesh,
            rules=rules,
            seed=0,
        )
