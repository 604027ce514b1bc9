"""Mesh construction, logical-axis rules, and that sharding never changes the numbers.

Runs on the 8 simulated CPU devices from conftest.py: a 2x2x2 (data, fsdp, tensor) mesh must
shard a tiny Gemma 3 model's parameters and optimizer state and take the same train step as
one device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train.mesh import (
    DEFAULT_RULES,
    MeshConfig,
    MeshError,
    batch_sharding,
    data_parallel_size,
    init_sharded,
    like_params_shardings,
    logical_constraint,
    make_mesh,
    param_shardings,
    resolve_mesh_shape,
    shard_params,
    spec_for,
)
from train.models.config import ModelConfig
from train.models.gemma import Transformer

CFG = ModelConfig(
    family="gemma3",
    vocab_size=64,
    num_layers=3,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    ffw_dim=64,
    layer_pattern=("local", "local", "global"),
    sliding_window=4,
)


@pytest.fixture(scope="module")
def mesh8():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


# -- mesh shape ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, want",
    [
        ({}, {"data": 8, "fsdp": 1, "tensor": 1}),
        ({"data": 2, "fsdp": -1, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}),
        ({"data": 1, "fsdp": 1, "tensor": -1}, {"data": 1, "fsdp": 1, "tensor": 8}),
        ({"data": 4, "fsdp": 2, "tensor": 1}, {"data": 4, "fsdp": 2, "tensor": 1}),
    ],
)
def test_resolve_fills_minus_one(kwargs, want):
    assert resolve_mesh_shape(MeshConfig(**kwargs), num_devices=8) == want


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": 3}, "data=3 x fsdp=1 x tensor=1 = 3 does not match 8 devices"),
        ({"fsdp": 3}, "fsdp=3 x tensor=1 = 3 does not divide 8 devices; valid:"),
    ],
)
def test_resolve_errors_name_the_key(kwargs, message):
    with pytest.raises(MeshError, match=message):
        resolve_mesh_shape(MeshConfig(**kwargs), num_devices=8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"tensor": 0}, "mesh.tensor=0: sizes must be >= 1"),
        ({"fsdp": -2}, "mesh.fsdp=-2"),
        ({"rules": {"embed": "model"}}, "mesh.rules.embed: unknown mesh axis 'model'"),
        ({"pipeline": 2}, "pipeline"),
    ],
)
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        MeshConfig(**kwargs)


def test_make_mesh_axes_and_devices(mesh8):
    assert mesh8.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh8.devices.flat) == set(jax.devices())
    assert data_parallel_size(mesh8) == 4
    with pytest.raises(MeshError, match="does not match 4 devices"):
        make_mesh(MeshConfig(data=8), devices=jax.devices()[:4])


# -- rules -----------------------------------------------------------------------------------


def test_spec_for_rules(mesh8):
    rules = DEFAULT_RULES
    assert spec_for(("vocab", "embed"), (64, 32), mesh=mesh8, rules=rules) == P("tensor", "fsdp")
    # batch takes fsdp first, so embed (which also asks for fsdp) stays replicated.
    assert spec_for(("batch", "seq", "embed"), (8, 16, 32), mesh=mesh8, rules=rules) == P(
        ("data", "fsdp"), None, None
    )
    # One mesh axis per spec: the first dimension that asks for `tensor` gets it.
    assert spec_for(("heads", "mlp"), (4, 64), mesh=mesh8, rules=rules) == P("tensor", None)
    # Unknown names and replicated names.
    assert spec_for(("mystery", "layers"), (4, 4), mesh=mesh8, rules=rules) == P(None, None)
    # Overrides replace a default.
    no_fsdp = {**rules, "embed": None}
    assert spec_for(("vocab", "embed"), (64, 32), mesh=mesh8, rules=no_fsdp) == P("tensor", None)


def test_spec_for_divisibility_fallback(mesh8):
    # vocab 61 cannot be split 2 ways; the embed dimension is still FSDP-sharded.
    assert spec_for(("vocab", "embed"), (61, 32), mesh=mesh8, rules=DEFAULT_RULES) == P(
        None, "fsdp"
    )
    # A batch of 2 cannot be split 4 ways (data x fsdp): replicated rather than padded.
    assert spec_for(("batch", "seq"), (2, 16), mesh=mesh8, rules=DEFAULT_RULES) == P(None, None)
    # Once unused, fsdp is free for a later dimension.
    assert spec_for(("batch", "embed"), (2, 32), mesh=mesh8, rules=DEFAULT_RULES) == P(None, "fsdp")


def test_spec_for_drops_size_one_axes():
    mesh = make_mesh(MeshConfig(data=-1))
    assert spec_for(("batch", "embed"), (8, 32), mesh=mesh, rules=DEFAULT_RULES) == P("data", None)
    assert spec_for(("vocab", "embed"), (64, 32), mesh=mesh, rules=DEFAULT_RULES) == P(None, None)


def test_logical_rules_merge_overrides():
    rules = MeshConfig(rules={"embed": None, "seq": ["tensor"]}).logical_rules()
    assert rules["embed"] is None and rules["seq"] == ("tensor",)
    assert rules["batch"] == ("data", "fsdp")


# -- parameters and optimizer state ----------------------------------------------------------


def _shard_shape(x):
    return x.addressable_shards[0].data.shape


def test_fsdp_mesh_shards_params_and_optimizer_state(mesh8):
    model = shard_params(Transformer(CFG, rngs=nnx.Rngs(0)), mesh=mesh8, rules=DEFAULT_RULES)
    embed = model.embed[...]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert _shard_shape(embed) == (32, 16)
    gate = model.units.blocks[0].mlp.gate[...]  # [layers, embed, mlp]
    assert gate.sharding.spec == P(None, "fsdp", "tensor")
    assert _shard_shape(gate) == (1, 16, 32)
    q = model.units.blocks[2].temporal.q[...]  # [layers, embed, heads, head_dim]
    assert _shard_shape(q) == (1, 16, 2, 8)

    params = nnx.state(model, nnx.Param)
    shardings = param_shardings(params, mesh=mesh8, rules=DEFAULT_RULES)
    opt = optax.adamw(1e-3)
    opt_shardings = like_params_shardings(
        jax.eval_shape(opt.init, params), params=params, shardings=shardings
    )
    opt_state = jax.jit(opt.init, out_shardings=opt_shardings)(params)
    adam = opt_state[0]
    for moment in (adam.mu, adam.nu):
        assert moment["embed"][...].sharding.spec == P("tensor", "fsdp")
        assert _shard_shape(moment["units"]["blocks"][0]["mlp"]["gate"][...]) == (1, 16, 32)
    assert adam.count.sharding.spec == P()
    # Also works on a pure-dict copy of the parameters (what a checkpoint restores).
    pure = nnx.to_pure_dict(params)
    pure_opt = like_params_shardings(opt.init(pure), params=params, shardings=shardings)
    assert pure_opt[0].mu["embed"].spec == P("tensor", "fsdp")


def test_init_sharded_creates_shards_directly(mesh8):
    model = init_sharded(
        lambda: Transformer(CFG, rngs=nnx.Rngs(0)), mesh=mesh8, rules=DEFAULT_RULES
    )
    embed = model.embed[...]
    assert embed.sharding == NamedSharding(mesh8, P("tensor", "fsdp"))
    assert _shard_shape(embed) == (32, 16)
    down = model.units.blocks[1].mlp.down[...]  # [layers, mlp, embed]
    assert down.sharding.spec == P(None, "tensor", "fsdp")
    # Sharding does not change the random draws: bit-identical to a jitted one-device build
    # (an eager build may differ in the last bit, where XLA fuses the initialiser's scaling).
    build = jax.jit(lambda: nnx.state(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param), build())


def test_batch_sharding_and_logical_constraint(mesh8, mesh1):
    tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32), batch_sharding(mesh8))
    assert _shard_shape(tokens) == (2, 16)

    @jax.jit
    def f(x):
        return logical_constraint(x * 2, ("batch", "seq", "embed"), mesh=mesh8, rules=DEFAULT_RULES)

    y = f(jnp.ones((8, 16, 32)))
    assert y.sharding.is_equivalent_to(NamedSharding(mesh8, P(("data", "fsdp"), None, None)), 3)
    x = jnp.ones((2, 3))
    assert logical_constraint(x, ("batch", "embed"), mesh=mesh1, rules=DEFAULT_RULES) is x


# -- a train step computes the same numbers on any mesh --------------------------------------


def _train_step(mesh, params0, graphdef, tokens):
    """One jitted loss + grad + AdamW update with explicit shardings on `mesh`."""
    rules = DEFAULT_RULES
    opt = optax.adamw(1e-2, weight_decay=0.1)
    p_sh = param_shardings(params0, mesh=mesh, rules=rules)
    o_sh = like_params_shardings(jax.eval_shape(opt.init, params0), params=params0, shardings=p_sh)
    # The step donates its input, and device_put may reuse params0's buffer for device 0's
    # replica (even with may_alias=False), so hand it a copy.
    params = jax.device_put(jax.tree.map(jnp.copy, params0), p_sh)
    opt_state = jax.jit(opt.init, out_shardings=o_sh)(params)
    tokens = jax.device_put(tokens, batch_sharding(mesh))

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        logits = logical_constraint(logits, ("batch", "seq", "vocab"), mesh=mesh, rules=rules)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    replicated = NamedSharding(mesh, P())
    step = jax.jit(
        step,
        in_shardings=(p_sh, o_sh, batch_sharding(mesh)),
        out_shardings=(p_sh, o_sh, replicated),
        donate_argnums=(0, 1),
    )
    params, opt_state, loss = step(params, opt_state, tokens)
    return params, loss


def test_train_step_matches_single_device(mesh8, mesh1):
    graphdef, params0 = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    p8, loss8 = _train_step(mesh8, params0, graphdef, tokens)
    p1, loss1 = _train_step(mesh1, params0, graphdef, tokens)
    assert p8["embed"][...].sharding.spec == P("tensor", "fsdp")
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), p8, p1
    )
    # The step did something: parameters moved.
    assert not np.allclose(np.asarray(p1["embed"][...]), np.asarray(params0["embed"][...]))
