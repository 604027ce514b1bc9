"""Post-training losses against float64 numpy references written here, values and gradients.

The references loop over prompts, sequences and tokens and use the textbook formulas (PPO's
clipped surrogate, Schulman's k1 / k3, leave-one-out baselines, J-BOND's REINFORCE gradient),
independently of `train/losses.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.losses import (
    bond_log_cdf,
    bradley_terry_loss,
    group_advantages,
    jbond_loss,
    policy_gradient_loss,
    token_logprobs,
)

RTOL = 1e-5  # float32 loss vs float64 reference
ATOL = 1e-6  # for entries that are 0 in the reference


def _close(got, want, atol=ATOL):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=atol)


# ------------------------------------------------------------------------------------------------
# token_logprobs


@pytest.mark.parametrize("vocab_chunk", [None, 4])
def test_token_logprobs_match_log_softmax(vocab_chunk):
    rng = np.random.default_rng(0)
    b, t, v = 2, 5, 11
    logits = rng.normal(size=(b, t, v)).astype(np.float32) * 3
    targets = rng.integers(0, v, size=(b, t))
    want = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            x = logits[i, j].astype(np.float64)
            want[i, j] = x[targets[i, j]] - np.log(np.sum(np.exp(x)))
    got = token_logprobs(
        logits=jnp.asarray(logits), targets=jnp.asarray(targets), vocab_chunk=vocab_chunk
    )
    assert got.dtype == jnp.float32 and got.shape == (b, t)
    _close(got, want)

    # d/dlogits of sum w * logprob = w * (onehot(target) - softmax)
    w = rng.normal(size=(b, t))
    grad = jax.grad(
        lambda x: (
            token_logprobs(logits=x, targets=jnp.asarray(targets), vocab_chunk=vocab_chunk)
            * jnp.asarray(w, jnp.float32)
        ).sum()
    )(jnp.asarray(logits))
    want_grad = np.zeros((b, t, v))
    for i in range(b):
        for j in range(t):
            x = logits[i, j].astype(np.float64)
            p = np.exp(x) / np.sum(np.exp(x))
            onehot = np.zeros(v)
            onehot[targets[i, j]] = 1.0
            want_grad[i, j] = w[i, j] * (onehot - p)
    _close(grad, want_grad)


def test_token_logprobs_bf16_logits_in_float32():
    logits = jnp.asarray([[[1.0, 2.0, 3.0]]], jnp.bfloat16)
    got = token_logprobs(logits=logits, targets=jnp.asarray([[2]]))
    assert got.dtype == jnp.float32
    _close(got, [[3.0 - np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))]])


# ------------------------------------------------------------------------------------------------
# group_advantages

REWARDS = np.array(
    [
        [1.0, 0.0, 0.0, 1.0],
        [0.5, 0.5, 0.5, 0.5],  # all equal: no signal
        [3.0, -1.0, 2.0, 0.25],
    ]
)


def _group_ref(rewards, method, baseline=None, std_normalize=True, eps=1e-6):
    p, g = rewards.shape
    out = np.zeros((p, g))
    for i in range(p):
        group = [float(x) for x in rewards[i]]
        mean = sum(group) / g
        std = (sum((x - mean) ** 2 for x in group) / g) ** 0.5
        for k in range(g):
            if method == "grpo":
                out[i, k] = (group[k] - mean) / (std + eps) if std_normalize else group[k] - mean
            elif method == "rloo":
                others = [group[m] for m in range(g) if m != k]
                out[i, k] = group[k] - sum(others) / len(others)
            else:
                b = rewards.mean() if baseline is None else baseline
                out[i, k] = group[k] - b
    return out


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("grpo", {}),
        ("grpo", {"std_normalize": False}),
        ("rloo", {}),
        ("reinforce", {"baseline": 0.3}),
        ("reinforce", {}),
    ],
)
def test_group_advantages(method, kwargs):
    got = group_advantages(rewards=jnp.asarray(REWARDS, jnp.float32), method=method, **kwargs)
    assert got.dtype == jnp.float32 and got.shape == REWARDS.shape
    assert np.all(np.isfinite(np.asarray(got)))
    _close(got, _group_ref(REWARDS, method, **kwargs))
    if method in ("grpo", "rloo"):
        np.testing.assert_array_equal(np.asarray(got)[1], 0.0)  # all-equal group


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="rloo"):
        group_advantages(rewards=jnp.ones((3, 1)), method="rloo")
    with pytest.raises(ValueError, match="method"):
        group_advantages(rewards=jnp.ones((3, 2)), method="ppo")
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(rewards=jnp.ones((6,)), method="grpo")


# ------------------------------------------------------------------------------------------------
# policy_gradient_loss


def _pg_batch():
    """Ratios on both sides of [0.8, 1.2] for positive and negative advantages, and padding
    holding extreme values that must neither contribute nor put NaN in a gradient."""
    rng = np.random.default_rng(1)
    ratios = np.array(
        [
            [1.5, 0.6, 1.1, 0.9, 1.3, 1.0],
            [1.5, 0.6, 1.1, 0.7, 1.25, 0.95],
            [0.5, 1.4, 1.05, 1.0, 1.0, 1.0],
        ]
    )
    mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.float32)
    logprobs = -rng.uniform(0.1, 3.0, size=ratios.shape)
    old = logprobs - np.log(ratios)
    ref = logprobs + rng.normal(scale=0.5, size=ratios.shape)
    off = mask == 0
    logprobs[off], old[off], ref[off] = 0.0, -200.0, -500.0
    advantages = np.array([1.3, -0.7, 0.4])
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    # the float32 copies are the inputs: the reference runs on exactly the same numbers
    lp, old, ref, advantages = (
        np.asarray(f32(x), np.float64) for x in (logprobs, old, ref, advantages)
    )
    return lp, old, ref, advantages, mask


def _pg_ref(lp, old, adv, mask, ref, clip_eps, kl_coef, kl_estimator):
    """(loss, loss_sum, pg_sum, kl_sum, clip_frac_sum, ratio_sum, d loss / d logprobs)."""
    b, t = lp.shape
    tokens = mask.sum()
    pg_sum = kl_sum = clip_sum = ratio_sum = 0.0
    grad = np.zeros((b, t))
    for i in range(b):
        a = adv[i]
        for j in range(t):
            if not mask[i, j]:
                continue
            r = np.exp(lp[i, j] - old[i, j])
            if clip_eps is None:
                pg, dpg, clipped = -r * a, -r * a, False
            else:
                rc = min(max(r, 1 - clip_eps), 1 + clip_eps)
                pg = -min(r * a, rc * a)
                clipped = rc * a < r * a  # the clipped branch is taken and it is flat
                dpg = 0.0 if clipped else -r * a
            if ref is None:
                kl, dkl = 0.0, 0.0
            elif kl_estimator == "k1":
                kl, dkl = lp[i, j] - ref[i, j], 1.0
            else:
                x = ref[i, j] - lp[i, j]
                kl, dkl = np.exp(x) - x - 1, -np.exp(x) + 1
            pg_sum += pg
            kl_sum += kl
            clip_sum += clipped
            ratio_sum += r
            grad[i, j] = (dpg + kl_coef * dkl) / tokens
    loss_sum = pg_sum + kl_coef * kl_sum
    return loss_sum / tokens, loss_sum, pg_sum, kl_sum, clip_sum, ratio_sum, grad


@pytest.mark.parametrize("clip_eps", [0.2, None])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_policy_gradient_loss_value_and_gradient(clip_eps, kl_estimator):
    lp, old, ref, adv, mask = _pg_batch()
    kl_coef = 0.3
    kw = dict(
        old_logprobs=jnp.asarray(old, jnp.float32),
        advantages=jnp.asarray(adv, jnp.float32),
        mask=jnp.asarray(mask),
        ref_logprobs=jnp.asarray(ref, jnp.float32),
        clip_eps=clip_eps,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
    )
    fn = jax.jit(jax.value_and_grad(lambda x: policy_gradient_loss(logprobs=x, **kw), has_aux=True))
    (loss, m), grad = fn(jnp.asarray(lp, jnp.float32))
    want = _pg_ref(lp, old, adv, mask, ref, clip_eps, kl_coef, kl_estimator)
    _close(loss, want[0])
    _close(m["loss"], want[0])
    _close(m["loss_sum"], want[1])
    _close(m["tokens"], mask.sum())
    _close(m["pg_sum"], want[2])
    _close(m["kl_sum"], want[3])
    _close(m["clip_frac_sum"], want[4])
    _close(m["ratio_sum"], want[5])
    assert np.all(np.isfinite(np.asarray(grad)))
    _close(grad, want[6])
    if clip_eps is not None:
        # A > 0 and ratio > 1.2: row 0's 1.5 and 1.3, row 2's 1.4; A < 0 and ratio < 0.8:
        # row 1's 0.6 and 0.7. Not clipped: row 1's 1.5 and 1.25, row 2's 0.5 (the surrogate
        # keeps pulling those back towards the old policy)
        assert float(m["clip_frac_sum"]) == 5.0


def test_policy_gradient_on_policy_is_reinforce():
    lp, _, _, adv, mask = _pg_batch()
    x = jnp.asarray(lp, jnp.float32)
    for clip_eps in (0.2, None):

        def f(x, clip_eps=clip_eps):
            return policy_gradient_loss(
                logprobs=x,
                old_logprobs=x,
                advantages=jnp.asarray(adv, jnp.float32),
                mask=jnp.asarray(mask),
                clip_eps=clip_eps,
            )

        (loss, m), grad = jax.value_and_grad(f, has_aux=True)(x)
        want = -adv[:, None] * mask / mask.sum()  # -A grad logprob, per token
        _close(grad, want)
        _close(loss, want.sum())
        _close(m["ratio_sum"], mask.sum())
        assert float(m["clip_frac_sum"]) == 0.0 and float(m["kl_sum"]) == 0.0


def test_policy_gradient_k3_is_non_negative_and_validates():
    lp, old, ref, adv, mask = _pg_batch()
    _, m = policy_gradient_loss(
        logprobs=jnp.asarray(lp, jnp.float32),
        old_logprobs=jnp.asarray(old, jnp.float32),
        advantages=jnp.asarray(adv, jnp.float32),
        mask=jnp.asarray(mask),
        ref_logprobs=jnp.asarray(ref, jnp.float32),
    )
    assert float(m["kl_sum"]) > 0
    with pytest.raises(ValueError, match="kl_estimator"):
        policy_gradient_loss(
            logprobs=jnp.zeros((1, 1)),
            old_logprobs=jnp.zeros((1, 1)),
            advantages=jnp.zeros((1,)),
            mask=jnp.ones((1, 1)),
            kl_estimator="k2",
        )


# ------------------------------------------------------------------------------------------------
# J-BOND


def test_bond_log_cdf_hand_example():
    anchor = np.array([[0.0, 1.0, 1.0, 2.0]] * 4)
    samples = np.array([1.0, 3.0, -1.0, 0.5])
    # (less + 0.5 equal + 0.5) / (M + 1), M = 4
    want = np.log([(1 + 1 + 0.5) / 5, (4 + 0.5) / 5, 0.5 / 5, (1 + 0.5) / 5])
    np.testing.assert_allclose(bond_log_cdf(sample_rewards=samples, anchor_rewards=anchor), want)


def _jbond_batch():
    rng = np.random.default_rng(2)
    b, t = 4, 5
    best_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    sample_mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    best = -rng.uniform(0.1, 3.0, size=(b, t))
    sample = -rng.uniform(0.1, 3.0, size=(b, t))
    anchor = sample + rng.normal(scale=0.4, size=(b, t))
    log_cdf = np.log(rng.uniform(0.1, 0.95, size=b))
    f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)  # noqa: E731
    return (
        f32(best),
        best_mask.astype(np.float32),
        f32(sample),
        f32(anchor),
        sample_mask.astype(np.float32),
        f32(log_cdf),
    )


def _jbond_ref(best, best_mask, sample, anchor, sample_mask, log_cdf, n, beta):
    b, t = best.shape
    tokens = best_mask.sum() + sample_mask.sum()
    fwd = -sum(best[i, j] for i in range(b) for j in range(t) if best_mask[i, j])
    rows = [i for i in range(b) if sample_mask[i].any()]
    cost = {}
    kl_anchor = 0.0
    for i in rows:
        log_ratio = sum(sample[i, j] - anchor[i, j] for j in range(t) if sample_mask[i, j])
        kl_anchor += log_ratio
        cost[i] = log_ratio - (n - 1) * log_cdf[i]
    baseline = sum(cost.values()) / len(rows)
    bwd = 0.0
    grad_sample = np.zeros((b, t))
    for i in rows:
        seq_logprob = sum(sample[i, j] for j in range(t) if sample_mask[i, j])
        bwd += (cost[i] - baseline) * seq_logprob
        # REINFORCE on the reverse KL: (log pi - log p_BoN - baseline) * grad log pi(y)
        grad_sample[i] = (1 - beta) * (cost[i] - baseline) * sample_mask[i] / tokens
    loss_sum = beta * fwd + (1 - beta) * bwd
    grad_best = -beta * best_mask / tokens
    return loss_sum / tokens, loss_sum, tokens, fwd, bwd, kl_anchor, grad_best, grad_sample


@pytest.mark.parametrize("beta", [0.5, 0.2])
def test_jbond_loss_value_and_gradient(beta):
    best, best_mask, sample, anchor, sample_mask, log_cdf = _jbond_batch()
    n = 4

    def f(best_lp, sample_lp):
        return jbond_loss(
            best_logprobs=best_lp,
            best_mask=jnp.asarray(best_mask),
            sample_logprobs=sample_lp,
            sample_anchor_logprobs=jnp.asarray(anchor, jnp.float32),
            sample_mask=jnp.asarray(sample_mask),
            sample_log_cdf=jnp.asarray(log_cdf, jnp.float32),
            n=n,
            beta=beta,
        )

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (loss, m), (g_best, g_sample) = fn(
        jnp.asarray(best, jnp.float32), jnp.asarray(sample, jnp.float32)
    )
    want = _jbond_ref(best, best_mask, sample, anchor, sample_mask, log_cdf, n, beta)
    _close(loss, want[0])
    _close(m["loss"], want[0])
    _close(m["loss_sum"], want[1])
    _close(m["tokens"], want[2])
    _close(m["fwd_sum"], want[3])
    _close(m["bwd_sum"], want[4])
    _close(m["kl_anchor_sum"], want[5])
    _close(g_best, want[6])
    _close(g_sample, want[7])


def test_jbond_backward_gradient_is_reverse_kl_in_expectation():
    """A one-token policy pi = softmax(theta) over 3 outcomes, batches of 2 samples: the exact
    expectation of the loss's gradient over all 9 batches is (B - 1) / B * grad KL(pi || BoN) per
    sample token, here grad KL / 2, the batch-mean baseline costing the factor (B - 1) / B."""
    anchor_p = np.array([0.5, 0.3, 0.2])  # outcomes in increasing reward order
    n = 3
    cdf = np.cumsum(anchor_p)
    bon = cdf**n - (cdf - anchor_p) ** n  # the exact Best-of-n distribution
    # the F for which log p_BoN = log p_anchor + log n + (n - 1) log F holds exactly
    log_f = (np.log(bon) - np.log(anchor_p) - np.log(n)) / (n - 1)
    theta = np.array([0.2, -0.1, 0.4])
    pi = np.exp(theta) / np.exp(theta).sum()
    kl = np.sum(pi * np.log(pi / bon))
    grad_kl = pi * (np.log(pi / bon) - kl)  # d/dtheta KL(softmax(theta) || bon)

    def loss(theta, ks):
        return jbond_loss(
            best_logprobs=jnp.zeros((2, 1)),
            best_mask=jnp.zeros((2, 1)),
            sample_logprobs=jax.nn.log_softmax(theta)[ks][:, None],
            sample_anchor_logprobs=jnp.asarray(np.log(anchor_p), jnp.float32)[ks][:, None],
            sample_mask=jnp.ones((2, 1)),
            sample_log_cdf=jnp.asarray(log_f, jnp.float32)[ks],
            n=n,
            beta=0.0,
        )[0]

    grad = jax.jit(jax.grad(loss))
    expected = np.zeros(3)
    for k1 in range(3):
        for k2 in range(3):
            g = grad(jnp.asarray(theta, jnp.float32), jnp.asarray([k1, k2]))
            expected += pi[k1] * pi[k2] * np.asarray(g, np.float64)
    np.testing.assert_allclose(expected, grad_kl / 2, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------
# Bradley-Terry


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_loss_value_and_gradient(with_margin):
    chosen = np.array([1.0, -0.5, 2.0, 30.0, -40.0])
    rejected = np.array([0.0, 0.5, 2.5, -30.0, 40.0])  # includes |diff| far out in both tails
    margin = np.array([0.5, 0.0, 1.0, 2.0, 0.3]) if with_margin else np.zeros(5)
    b = len(chosen)
    loss_sum = accuracy = margin_sum = 0.0
    g_chosen, g_rejected = np.zeros(b), np.zeros(b)
    for i in range(b):
        x = chosen[i] - rejected[i] - margin[i]
        loss_sum += np.log1p(np.exp(-x))  # -log sigmoid(x)
        accuracy += chosen[i] > rejected[i]
        margin_sum += chosen[i] - rejected[i]
        d = -1.0 / (1.0 + np.exp(x))  # d/dx of -log sigmoid(x) = -(1 - sigmoid(x))
        g_chosen[i], g_rejected[i] = d / b, -d / b

    def f(c, r):
        return bradley_terry_loss(
            chosen=c, rejected=r, margin=jnp.asarray(margin, jnp.float32) if with_margin else None
        )

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (loss, m), (gc, gr) = fn(jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32))
    _close(loss, loss_sum / b)
    _close(m["loss_sum"], loss_sum)
    _close(m["tokens"], b)
    _close(m["accuracy_sum"], accuracy)
    _close(m["margin_sum"], margin_sum)
    _close(gc, g_chosen, atol=1e-12)
    _close(gr, g_rejected, atol=1e-12)
