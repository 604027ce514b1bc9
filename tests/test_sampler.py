"""Tests for train/sampler.py: cached decoding against a full forward pass, filters, stops.

Tiny random float32 models on CPU. Compiling is what costs time here, so the tests share a few
sampling settings (one compiled program each) and one batched run per model.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train.models.config import ModelConfig
from train.models.gemma import Transformer
from train.sampler import check_sampling_args, filter_logits, sample, sample_logits

COMMON = dict(vocab_size=64, d_model=32, num_heads=4, head_dim=8, ffw_dim=48, sliding_window=4)
CONFIGS = {
    # 1 unit of 5 local : 1 global plus a 1-layer tail; the window (4) is far shorter than the
    # prompt + generation, so the local ring buffers wrap.
    "gemma3": ModelConfig(
        family="gemma3",
        num_layers=7,
        num_kv_heads=2,
        layer_pattern=("local",) * 5 + ("global",),
        **COMMON,
    ),
    "gemma2": ModelConfig(
        family="gemma2",
        num_layers=4,
        num_kv_heads=2,
        layer_pattern=("local", "global"),
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        query_pre_attn_scalar=16.0,
        **COMMON,
    ),
    "griffin": ModelConfig(
        family="griffin",
        num_layers=4,
        num_kv_heads=1,
        layer_pattern=("recurrent", "recurrent", "local"),
        lru_width=32,
        rope_fraction=0.5,
        **COMMON,
    ),
}
# Different lengths in one batch (left padding); the 1-token prompt leaves Griffin's conv state
# holding mostly padding.
PROMPTS = [[3, 17, 9], [5, 6, 7, 8, 9, 10, 11, 12, 13], [42], [1, 2, 3, 4, 5]]
WIDTH = max(len(p) for p in PROMPTS)
NEW = 8
GREEDY = dict(max_new_tokens=NEW, greedy=True, return_logits=True)
SAMPLED = dict(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.95, return_logits=True)


@functools.cache
def make_model(name: str) -> Transformer:
    """A random model. Weights are drawn with numpy into the abstract model: eager `Transformer`
    init compiles one XLA program per initializer op (~10 s per config on CPU). Every weight,
    norm scales and biases included, is N(0, 0.2^2), so no code path sees all-zero parameters
    and greedy decoding does not collapse onto one token."""
    cfg = CONFIGS[name]
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.2, a.shape), a.dtype), state)
    return nnx.merge(graphdef, state)


@nnx.jit
def _forward(model, tokens, segment_ids):
    return model(tokens, segment_ids=segment_ids)


def full_forward_logits(model, generated) -> list[np.ndarray]:
    """Per row, the raw logits [NEW, vocab] that predict `generated` [batch, NEW] from one
    uncached forward pass over prompt + generated (right-padded: causal, so padding after a
    row cannot change it)."""
    total = WIDTH + NEW
    tokens = np.zeros((len(PROMPTS), total), np.int32)
    segment_ids = np.zeros((len(PROMPTS), total), np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p) + NEW] = list(p) + list(np.asarray(generated[i]))
        segment_ids[i, : len(p) + NEW] = 1
    logits = np.asarray(_forward(model, jnp.asarray(tokens), jnp.asarray(segment_ids)))
    return [logits[i, len(p) - 1 : len(p) - 1 + NEW] for i, p in enumerate(PROMPTS)]


@pytest.fixture(scope="module", params=list(CONFIGS))
def runs(request):
    """One greedy and one sampled batched run per model, with the full-forward references."""
    model = make_model(request.param)
    greedy = sample(model, PROMPTS, rng=jax.random.key(0), **GREEDY)
    sampled = sample(model, PROMPTS, rng=jax.random.key(3), **SAMPLED)
    return SimpleNamespace(
        model=model,
        greedy=greedy,
        sampled=sampled,
        greedy_ref=full_forward_logits(model, greedy.tokens),
        sampled_ref=full_forward_logits(model, sampled.tokens),
    )


def log_softmax_at(logits, tokens):
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(tokens)), tokens]


def test_greedy_decode_matches_full_forward(runs):
    out = runs.greedy
    assert out.tokens.shape == (len(PROMPTS), NEW) and out.tokens.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32
    np.testing.assert_array_equal(out.lengths, NEW)
    assert not out.done.any()
    for i, ref in enumerate(runs.greedy_ref):
        toks = np.asarray(out.tokens[i])
        np.testing.assert_allclose(out.logits[i], ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(out.logprobs[i], log_softmax_at(ref, toks), atol=1e-4, rtol=0)
        np.testing.assert_array_equal(toks, ref.argmax(-1))
    np.testing.assert_array_equal(out.sampling_logprobs, 0.0)


def test_sampled_decode_matches_full_forward(runs):
    out = runs.sampled
    filters = {k: SAMPLED[k] for k in ("temperature", "top_k", "top_p")}
    for i, ref in enumerate(runs.sampled_ref):
        toks = np.asarray(out.tokens[i])
        np.testing.assert_allclose(out.logits[i], ref, atol=1e-4, rtol=0)
        np.testing.assert_allclose(out.logprobs[i], log_softmax_at(ref, toks), atol=1e-4, rtol=0)
        expected = log_softmax_at(filter_logits(ref, **filters), toks)
        np.testing.assert_allclose(out.sampling_logprobs[i], expected, atol=1e-4, rtol=0)


def test_each_row_equals_its_prompt_sampled_alone(runs):
    for i, prompt in enumerate(PROMPTS):
        # Wider than the batch, so every row also sees a different amount of padding; one width
        # for all rows keeps it to one compiled program.
        alone = sample(
            runs.model, [prompt], rng=jax.random.key(0), max_prompt_len=WIDTH + 2, **GREEDY
        )
        np.testing.assert_array_equal(alone.tokens[0], runs.greedy.tokens[i])
        np.testing.assert_allclose(alone.logprobs[0], runs.greedy.logprobs[i], atol=1e-5, rtol=0)


def test_prompt_array_with_lengths_equals_prompt_list():
    model = make_model("gemma3")
    tokens = np.full((len(PROMPTS), WIDTH), 7, np.int32)
    for i, p in enumerate(PROMPTS):
        tokens[i, : len(p)] = p
    lengths = [len(p) for p in PROMPTS]
    from_list = sample(model, PROMPTS, rng=jax.random.key(3), **SAMPLED)
    from_array = sample(
        model, jnp.asarray(tokens), prompt_lengths=lengths, rng=jax.random.key(3), **SAMPLED
    )
    np.testing.assert_array_equal(from_list.tokens, from_array.tokens)
    np.testing.assert_allclose(from_list.logprobs, from_array.logprobs, atol=1e-6, rtol=0)


def test_top_k_1_equals_greedy():
    model = make_model("gemma3")
    greedy = sample(model, PROMPTS, rng=jax.random.key(0), **GREEDY)
    top1 = sample(model, PROMPTS, rng=jax.random.key(5), **(SAMPLED | dict(top_k=1)))
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    np.testing.assert_allclose(top1.logprobs, greedy.logprobs, atol=1e-6, rtol=0)
    np.testing.assert_allclose(top1.sampling_logprobs, 0.0, atol=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)  # by probability: 1, 3, 4, 2, 0
    logits = jnp.log(jnp.asarray(probs))[None]
    cases = {
        0.1: {1},
        0.49: {1},
        0.6: {1, 3},
        0.8: {1, 3, 4},
        0.9: {1, 3, 4, 2},
        1.0: set(range(5)),
    }
    for p, expected in cases.items():
        kept = np.flatnonzero(np.isfinite(filter_logits(logits, top_p=p)[0]))
        assert set(kept.tolist()) == expected, p
    # Kept logits are unchanged; renormalising is the softmax's job.
    out = filter_logits(logits, top_p=0.6)[0]
    np.testing.assert_allclose(out[jnp.array([1, 3])], logits[0, jnp.array([1, 3])])


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 2.0, -1.0]])
    cases = {1: {1}, 2: {1, 2}, 3: {1, 2, 3}, 5: set(range(5)), 9: set(range(5))}
    for k, expected in cases.items():
        kept = np.flatnonzero(np.isfinite(filter_logits(logits, top_k=k)[0]))
        assert set(kept.tolist()) == expected, k


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(0.5, None, None), (2.0, None, None), (1.0, 3, None), (1.5, 4, 0.7), (0.7, 4, 0.9)],
)
def test_sampling_frequencies_match_the_filtered_softmax(temperature, top_k, top_p):
    n = 20_000
    logits = jnp.asarray([2.0, 1.0, 0.0, -1.0, 0.5], jnp.float32)
    tokens, logp = _draw(logits, n, jax.random.key(7), temperature, top_p, top_k=top_k)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    expected = np.asarray(jax.nn.softmax(filtered))
    freq = np.bincount(np.asarray(tokens), minlength=logits.shape[0]) / n
    # The binomial std is <= 0.0036 at n = 20k; 0.015 is 4 sigma.
    np.testing.assert_allclose(freq, expected, atol=0.015, rtol=0)
    assert (freq[expected == 0] == 0).all()
    np.testing.assert_allclose(
        logp, np.asarray(filtered - jax.nn.logsumexp(filtered))[tokens], atol=1e-5, rtol=0
    )


@functools.partial(jax.jit, static_argnums=(1,), static_argnames=("top_k",))
def _draw(logits, n, rng, temperature, top_p, *, top_k):
    """n draws from one distribution; temperature and top_p traced so the cases share code."""
    batch = jnp.broadcast_to(logits, (n, logits.shape[0]))
    return sample_logits(batch, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)


def test_stop_tokens_end_rows():
    model = make_model("gemma3")
    free = sample(model, PROMPTS, rng=jax.random.key(11), **SAMPLED)
    free_tokens = np.asarray(free.tokens)
    stops = (int(free_tokens[0, 2]), 63)
    out = sample(model, PROMPTS, rng=jax.random.key(11), stop_tokens=stops, pad_id=-1, **SAMPLED)
    stopped_rows = 0
    for i in range(len(PROMPTS)):
        hits = np.flatnonzero(np.isin(free_tokens[i], stops))
        n = hits[0] + 1 if hits.size else NEW
        assert int(out.lengths[i]) == n
        assert bool(out.done[i]) == bool(hits.size)
        stopped_rows += bool(hits.size)
        # Same rng: identical up to and including the stop token, then padding.
        np.testing.assert_array_equal(out.tokens[i, :n], free_tokens[i, :n])
        np.testing.assert_array_equal(out.tokens[i, n:], -1)
        np.testing.assert_array_equal(out.logprobs[i, n:], 0.0)
        np.testing.assert_array_equal(out.mask[i], np.arange(NEW) < n)
    assert stopped_rows >= 1
    assert (out.logprobs[out.mask] < 0).all()


def test_all_rows_stopping_ends_the_loop():
    model = make_model("gemma3")
    free = sample(model, PROMPTS, rng=jax.random.key(11), **SAMPLED)
    first = tuple(int(t) for t in set(np.asarray(free.tokens[:, 0]).tolist()))
    out = sample(model, PROMPTS, rng=jax.random.key(11), stop_tokens=first, pad_id=-1, **SAMPLED)
    np.testing.assert_array_equal(out.lengths, 1)
    assert bool(out.done.all())
    np.testing.assert_array_equal(out.tokens[:, 1:], -1)
    # The loop stopped after the first token: no later step wrote its logits.
    np.testing.assert_array_equal(out.logits[:, 1:], 0.0)


def test_same_rng_same_output_and_rows_independent_of_each_other():
    model = make_model("gemma3")
    a = sample(model, PROMPTS, rng=jax.random.key(42), **SAMPLED)
    b = sample(model, PROMPTS, rng=jax.random.key(42), **SAMPLED)
    c = sample(model, PROMPTS, rng=jax.random.key(43), **SAMPLED)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # Row r draws with fold_in(rng, r): changing the other rows leaves row 0 alone.
    others = [PROMPTS[0], [9, 9], [60, 61, 62], [1]]
    d = sample(model, others, rng=jax.random.key(42), max_prompt_len=WIDTH, **SAMPLED)
    np.testing.assert_array_equal(d.tokens[0], a.tokens[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[[1, 2], []]), "empty prompt"),
        (dict(prompts=[]), "no prompts"),
        (dict(max_prompt_len=2), "longer than max_prompt_len"),
        (dict(prompts=np.ones((2, 3)), prompt_lengths=[3, 4]), "exceed the prompt width"),
        (dict(stop_tokens=(-1,)), "stop tokens"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    call = dict(prompts=[[1, 2, 3]], max_new_tokens=4, rng=jax.random.key(0)) | kwargs
    with pytest.raises(ValueError, match=match):
        sample(make_model("gemma3"), call.pop("prompts"), **call)


def test_greedy_ignores_temperature():
    check_sampling_args(temperature=0.0, top_k=None, top_p=None, greedy=True)
