"""Behaviour of the decoder itself: packing, caching, scan/remat equivalence, axes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.models.config import ModelConfig
from train.models.gemma import Transformer, num_params
from train.models.layers import param_axes, project

CONFIGS = {
    "gemma": dict(family="gemma", num_kv_heads=1),
    "gemma2": dict(
        family="gemma2",
        layer_pattern=("local", "global"),
        sliding_window=3,
        attn_logit_softcap=5.0,
        final_logit_softcap=4.0,
        query_pre_attn_scalar=12,
    ),
    "gemma3": dict(
        family="gemma3",
        layer_pattern=("local",) * 5 + ("global",),
        sliding_window=3,
        rope_base=1e6,
        rope_global_scale=8.0,
        num_layers=8,
    ),
    "griffin": dict(
        family="griffin",
        layer_pattern=("recurrent", "recurrent", "local"),
        sliding_window=3,
        lru_width=24,
        num_kv_heads=1,
        final_logit_softcap=30.0,
        rope_fraction=0.5,
    ),
}


def make(name, **kw):
    fields = dict(
        vocab_size=61,
        num_layers=5,
        d_model=24,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        ffw_dim=40,
    )
    fields.update(CONFIGS[name])
    fields.update(kw)
    model = Transformer(ModelConfig(**fields), rngs=nnx.Rngs(0))
    # non-trivial norm scales so that every parameter matters
    for path, v in nnx.state(model, nnx.Param).flat_state():
        if path[-1] == "scale":
            value = v.get_value()
            noise = jax.random.normal(jax.random.key(len(path)), value.shape) * 0.3
            v.set_value(noise.astype(value.dtype))
    return model


def rand_tokens(shape, seed=0, vocab=61):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_packed_equals_separate(name):
    model = make(name)
    a, b = rand_tokens((1, 7), 1), rand_tokens((1, 9), 2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 4), jnp.int32)], axis=1)  # + 4 pads
    positions = jnp.concatenate([jnp.arange(7), jnp.arange(9), jnp.zeros(4, int)])[None]
    segments = jnp.concatenate([jnp.full(7, 1), jnp.full(9, 2), jnp.zeros(4, int)])[None]
    out = model(packed, positions=positions, segment_ids=segments)
    np.testing.assert_allclose(out[:, :7], model(a), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[:, 7:16], model(b), atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decode_equals_full_forward(name):
    model = make(name)
    toks = rand_tokens((2, 12), 3)
    full = model(toks)
    cache = model.init_cache(batch=2, max_len=12)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    logits, cache = model(toks[:, :5], positions=pos[:, :5], cache=cache)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = model(toks[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-4, rtol=0)


def test_local_layers_cache_only_the_window():
    model = make("gemma3", sliding_window=3)
    cache = model.init_cache(batch=1, max_len=100)
    # 8 layers, pattern of 6: one scanned unit (5 local + 1 global) and a tail of 2 local
    sizes = [c["k"].shape[-3] for c in cache["units"]] + [c["k"].shape[-3] for c in cache["tail"]]
    assert sizes == [3, 3, 3, 3, 3, 100, 3, 3]
    griffin = make("griffin").init_cache(batch=1, max_len=10_000)
    assert griffin["units"][0]["h"].shape == (1, 1, 24)  # fixed state, whatever the length


@pytest.mark.parametrize("name", ["gemma3", "griffin"])
def test_scan_and_remat_do_not_change_numbers(name):
    toks = rand_tokens((2, 10), 4)

    def loss_and_grads(model):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(toks) ** 2))(model)
        return loss, jax.tree.leaves(grads)

    ref_loss, ref_grads = loss_and_grads(make(name))
    for kw in (dict(scan_layers=False), dict(remat="full"), dict(remat="save_matmuls")):
        loss, grads = loss_and_grads(make(name, **kw))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_parameter_has_logical_axes(name):
    model = make(name)
    state = nnx.state(model, nnx.Param)
    axes = param_axes(state)
    for (path, v), (_, names) in zip(state.flat_state(), axes.flat_state(), strict=True):
        names = names.get_value() if hasattr(names, "get_value") else names
        assert len(names) == v.get_value().ndim, path
        assert all(isinstance(n, str) for n in names), path
        if path[0] == "units":
            assert names[0] == "layers"


def test_bfloat16_params_and_compute():
    model = make("gemma3", param_dtype="bfloat16", compute_dtype="bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = model(rand_tokens((2, 10)))
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    # same seed, same weights up to rounding: bf16 approximates float32, it is not equal
    ref = make("gemma3")(rand_tokens((2, 10)))
    err = float(jnp.abs(out - ref).max())
    assert 0 < err < 0.1 * float(jnp.abs(ref).max())


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="sliding_window must be set"):
        ModelConfig(
            family="gemma2",
            vocab_size=8,
            num_layers=2,
            d_model=8,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            ffw_dim=8,
            layer_pattern=("local", "global"),
        )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(
            family="gemma",
            vocab_size=8,
            num_layers=2,
            d_model=8,
            num_heads=3,
            num_kv_heads=2,
            head_dim=4,
            ffw_dim=8,
        )
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(
            family="gemma",
            vocab_size=8,
            num_layers=2,
            d_model=8,
            num_heads=2,
            num_kv_heads=1,
            head_dim=4,
            ffw_dim=8,
            windw=3,
        )


def test_num_params_counts_tied_embedding_once():
    model = make("gemma")
    cfg = model.cfg
    per_layer = (
        cfg.d_model * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
        + 3 * cfg.d_model * cfg.ffw_dim
        + 2 * cfg.d_model
    )
    assert (
        num_params(model) == cfg.vocab_size * cfg.d_model + cfg.num_layers * per_layer + cfg.d_model
    )


def test_project_is_an_einsum_with_the_same_gradients():
    """layers.project materialises its cotangent on CPU (a performance device): values and
    gradients must be those of the plain einsum."""
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (2, 5, 8))
    w = jax.random.normal(k[1], (8, 3, 4))
    cot = jax.random.normal(k[2], (2, 5, 3, 4))

    def loss(fn):
        return lambda x, w: (jnp.tanh(fn("btd,dhk->bthk", x, w)) * cot).sum()

    ours = jax.jit(jax.value_and_grad(loss(project), argnums=(0, 1)))(x, w)
    plain = jax.jit(jax.value_and_grad(loss(jnp.einsum), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(float(ours[0]), float(plain[0]), rtol=1e-6)
    for a, b in zip(ours[1], plain[1], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
