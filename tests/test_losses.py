"""Distillation losses against float64 numpy references written here, gradients, chunking, memory.

The references loop over positions and use the textbook formulas, independently of
`train/losses.py` (which works in float32 with gathers, sentinels and hand-written gradients).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.losses import distill_loss, full_kl, next_token_ce, sampled_ce, topk_kl

RTOL = 1e-5  # float32 loss vs float64 reference

# ------------------------------------------------------------------------------------------------
# float64 references


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(p, q):
    """sum p log(p/q) over p > 0, float64."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    on = p > 0
    return float((p[on] * (np.log(p[on]) - np.log(q[on]))).sum())


def _positions(mask):
    b, t = mask.shape
    return [(i, j) for i in range(b) for j in range(t) if mask[i, j]]


def _mean(values, mask, scale=1.0):
    n = max(float(np.sum(mask)), 1.0)
    total = scale * sum(values)
    return total / n, total


def ref_sampled_ce(s, ids, lp, valid, mask, T, counts=None):
    ces, kls = [], []
    for i, j in _positions(mask):
        sel = np.flatnonzero(valid[i, j])
        if sel.size == 0:
            ces.append(0.0)
            kls.append(0.0)
            continue
        if counts is None:
            w = np.exp(_log_softmax(lp[i, j, sel] / T))
        else:
            c = counts[i, j, sel].astype(np.float64)
            w = c / c.sum()
        q = np.exp(_log_softmax(s[i, j] / T))[ids[i, j, sel]]
        ces.append(float(-(w * np.log(q)).sum()))
        kls.append(_kl(w, q))
    return _mean(ces, mask, T**2), _mean(kls, mask)[0]


def ref_topk_kl(s, ids, lp, valid, mask, T, renormalize):
    vocab = s.shape[-1]
    kls = []
    for i, j in _positions(mask):
        sel = np.flatnonzero(valid[i, j])
        if sel.size == 0:
            kls.append(0.0)
            continue
        top = ids[i, j, sel]
        p_top = np.exp(lp[i, j, sel].astype(np.float64))
        if renormalize == "both":
            p = p_top ** (1 / T) / (p_top ** (1 / T)).sum()
            q = np.exp(_log_softmax(s[i, j, top] / T))
        else:
            missing, others = max(1.0 - p_top.sum(), 0.0), vocab - sel.size
            tail = others * (missing / others) ** (1 / T) if missing > 0 and others > 0 else 0.0
            p = np.append(p_top ** (1 / T), tail)
            p /= p.sum()
            q_full = np.exp(_log_softmax(s[i, j] / T))
            q = np.append(q_full[top], 1.0 - q_full[top].sum())
        kls.append(_kl(p, q))
    (loss, _), kl = _mean(kls, mask, T**2), _mean(kls, mask)[0]
    return loss, kl


def ref_full(s, te, mask, T, divergence, beta=0.5):
    divs, fkls = [], []
    for i, j in _positions(mask):
        q = np.exp(_log_softmax(s[i, j] / T))
        p = np.exp(_log_softmax(te[i, j] / T))
        m = beta * p + (1 - beta) * q
        div = {
            "forward": _kl(p, q),
            "reverse": _kl(q, p),
            "jsd": beta * _kl(p, m) + (1 - beta) * _kl(q, m),
        }[divergence]
        divs.append(div)
        fkls.append(_kl(p, q))
    return _mean(divs, mask, T**2)[0], _mean(fkls, mask)[0]


def ref_hard_ce(s, targets, mask):
    nll = [-_log_softmax(s[i, j])[targets[i, j]] for i, j in _positions(mask)]
    return _mean(nll, mask)[0]


# ------------------------------------------------------------------------------------------------
# A hand-built batch: 2 x 4 positions, vocab 13, k up to 5

B, T_LEN, V, K = 2, 4, 13, 5


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=(B, T_LEN, V)).astype(np.float32)
    te = rng.normal(scale=2.0, size=(B, T_LEN, V)).astype(np.float32)
    full_lp = _log_softmax(te)
    ids = np.stack([[rng.permutation(V)[:K] for _ in range(T_LEN)] for _ in range(B)])
    lp = np.take_along_axis(full_lp, ids, -1).astype(np.float32)
    n_valid = np.array([[5, 3, 1, 0], [2, 5, 4, 5]])  # [0, 3]: a real position with nothing drawn
    valid = np.arange(K) < n_valid[..., None]
    # Padded slots hold junk the losses must ignore: out-of-range ids, -inf and NaN log-probs.
    ids = np.where(valid, ids, V + 7).astype(np.int32)
    lp = np.where(valid, lp, -np.inf).astype(np.float32)
    lp[1, 0, 4] = np.nan
    counts = np.where(valid, rng.integers(1, 9, size=ids.shape), 0).astype(np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1]], np.float32)  # [1, 1]: a padded position
    targets = rng.integers(0, V, size=(B, T_LEN)).astype(np.int32)
    return dict(s=s, te=te, ids=ids, lp=lp, valid=valid, counts=counts, mask=mask, targets=targets)


def _sparse_args(d):
    return dict(
        student_logits=jnp.asarray(d["s"]),
        ids=jnp.asarray(d["ids"]),
        teacher_logprobs=jnp.asarray(d["lp"]),
        valid=jnp.asarray(d["valid"]),
        mask=jnp.asarray(d["mask"]),
    )


def _check_metrics(loss, m, ref_loss, ref_kl, mask):
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL)
    np.testing.assert_allclose(float(m["loss"]), ref_loss, rtol=RTOL)
    np.testing.assert_allclose(float(m["kl_to_teacher"]), ref_kl, rtol=RTOL, atol=1e-7)
    assert float(m["tokens"]) == mask.sum()
    np.testing.assert_allclose(float(m["loss_sum"]), ref_loss * mask.sum(), rtol=RTOL)
    np.testing.assert_allclose(float(m["kl_sum"]), ref_kl * mask.sum(), rtol=RTOL, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Values against the references


@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("weights", ["probs", "counts"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_ce_matches_reference(temperature, weights, chunk):
    d = make_batch()
    counts = d["counts"] if weights == "counts" else None
    loss, m = sampled_ce(
        **_sparse_args(d),
        temperature=temperature,
        weights=weights,
        counts=None if counts is None else jnp.asarray(counts),
        vocab_chunk=chunk,
    )
    (ref, _), ref_kl = ref_sampled_ce(
        d["s"], d["ids"], d["lp"], d["valid"], d["mask"], temperature, counts
    )
    _check_metrics(loss, m, ref, ref_kl, d["mask"])


@pytest.mark.parametrize("renormalize", ["both", "teacher_only"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_matches_reference(temperature, renormalize):
    d = make_batch(1)
    loss, m = topk_kl(**_sparse_args(d), temperature=temperature, renormalize=renormalize)
    ref, ref_kl = ref_topk_kl(
        d["s"], d["ids"], d["lp"], d["valid"], d["mask"], temperature, renormalize
    )
    _check_metrics(loss, m, ref, ref_kl, d["mask"])


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_kl_matches_reference(temperature, divergence):
    d = make_batch(2)
    loss, m = full_kl(
        student_logits=jnp.asarray(d["s"]),
        teacher_logits=jnp.asarray(d["te"]),
        mask=jnp.asarray(d["mask"]),
        temperature=temperature,
        divergence=divergence,
    )
    ref, ref_kl = ref_full(d["s"], d["te"], d["mask"], temperature, divergence)
    _check_metrics(loss, m, ref, ref_kl, d["mask"])


@pytest.mark.parametrize("kind", ["sampled_ce", "topk_kl", "full_kl"])
def test_distill_loss_mixes_with_hard_label_ce(kind):
    d = make_batch(3)
    alpha, temperature = 0.3, 2.0
    if kind == "full_kl":
        teacher = dict(teacher_logits=jnp.asarray(d["te"]))
        ref_d, _ = ref_full(d["s"], d["te"], d["mask"], temperature, "forward")
    else:
        sparse = _sparse_args(d)
        teacher = {k: sparse[k] for k in ("ids", "teacher_logprobs", "valid")}
        if kind == "sampled_ce":
            (ref_d, _), _ = ref_sampled_ce(
                d["s"], d["ids"], d["lp"], d["valid"], d["mask"], temperature
            )
        else:
            ref_d, _ = ref_topk_kl(
                d["s"], d["ids"], d["lp"], d["valid"], d["mask"], temperature, "both"
            )
    ref_ce = ref_hard_ce(d["s"], d["targets"], d["mask"])
    common = dict(
        kind=kind,
        student_logits=jnp.asarray(d["s"]),
        mask=jnp.asarray(d["mask"]),
        hard_targets=jnp.asarray(d["targets"]),
        temperature=temperature,
        **teacher,
    )
    loss, m = distill_loss(alpha=alpha, **common)
    np.testing.assert_allclose(float(loss), alpha * ref_d + (1 - alpha) * ref_ce, rtol=RTOL)
    np.testing.assert_allclose(float(m["distill"]), ref_d, rtol=RTOL)
    np.testing.assert_allclose(float(m["ce"]), ref_ce, rtol=RTOL)
    np.testing.assert_allclose(float(m["loss_sum"]), float(loss) * d["mask"].sum(), rtol=RTOL)
    # alpha = 1 is the distillation loss alone; alpha = 0 is next_token_ce.
    loss1, m1 = distill_loss(alpha=1.0, **common)
    np.testing.assert_allclose(float(loss1), ref_d, rtol=RTOL)
    assert "ce" not in m1
    loss0, _ = distill_loss(alpha=0.0, **common)
    ce, _ = next_token_ce(
        logits=jnp.asarray(d["s"]), targets=jnp.asarray(d["targets"]), mask=jnp.asarray(d["mask"])
    )
    np.testing.assert_allclose(float(loss0), float(ce), rtol=RTOL)


def test_topk_with_k_equal_vocab_is_full_forward_kl():
    d = make_batch(4)
    rng = np.random.default_rng(4)
    ids = np.stack([[rng.permutation(V) for _ in range(T_LEN)] for _ in range(B)]).astype(np.int32)
    lp = np.take_along_axis(_log_softmax(d["te"]), ids, -1).astype(np.float32)
    sparse = dict(
        student_logits=jnp.asarray(d["s"]),
        ids=jnp.asarray(ids),
        teacher_logprobs=jnp.asarray(lp),
        valid=jnp.ones(ids.shape, bool),
        mask=jnp.asarray(d["mask"]),
    )
    for temperature in (1.0, 2.0):
        full, _ = full_kl(
            student_logits=jnp.asarray(d["s"]),
            teacher_logits=jnp.asarray(d["te"]),
            mask=jnp.asarray(d["mask"]),
            temperature=temperature,
        )
        for renormalize in ("both", "teacher_only"):
            loss, _ = topk_kl(**sparse, temperature=temperature, renormalize=renormalize)
            np.testing.assert_allclose(float(loss), float(full), rtol=RTOL)


def test_jsd_matches_reference_and_limits_follow_gkd():
    """GKD's JSD(beta) with p the teacher: JSD(beta) / beta -> KL(p || q) as beta -> 0 and
    JSD(beta) / (1 - beta) -> KL(q || p) as beta -> 1, with an error linear in the distance."""
    d = make_batch(5)
    args = dict(
        student_logits=jnp.asarray(d["s"]),
        teacher_logits=jnp.asarray(d["te"]),
        mask=jnp.asarray(d["mask"]),
    )

    def jsd(beta):
        loss = float(full_kl(**args, divergence="jsd", beta=beta)[0])
        ref = ref_full(d["s"], d["te"], d["mask"], 1.0, "jsd", beta)[0]
        np.testing.assert_allclose(loss, ref, rtol=RTOL)  # also near the end points
        return loss

    fwd = float(full_kl(**args, divergence="forward")[0])
    rev = float(full_kl(**args, divergence="reverse")[0])
    for eps in (1e-3, 1e-4):
        np.testing.assert_allclose(jsd(eps) / eps, fwd, rtol=25 * eps)
        np.testing.assert_allclose(jsd(1 - eps) / eps, rev, rtol=25 * eps)
    assert 0 < jsd(0.5) <= np.log(2)  # JSD(1/2) is at most log 2 per position


# ------------------------------------------------------------------------------------------------
# Monte-Carlo: sampled_ce tends to the full cross-entropy as the draws grow


def _draw(rng, logp, n_draws):
    """Distinct ids drawn from exp(logp) per position, padded: ids, logprobs, valid, counts."""
    rows = []
    for lp_row in logp.reshape(-1, logp.shape[-1]):
        p = np.exp(lp_row)
        uniq, cnt = np.unique(rng.choice(p.size, size=n_draws, p=p / p.sum()), return_counts=True)
        rows.append((uniq, cnt))
    k = max(len(u) for u, _ in rows)
    ids = np.zeros((len(rows), k), np.int32)
    counts = np.zeros((len(rows), k), np.int32)
    for r, (u, c) in enumerate(rows):
        ids[r, : len(u)], counts[r, : len(c)] = u, c
    shape = logp.shape[:-1] + (k,)
    lps = np.take_along_axis(logp.reshape(len(rows), -1), ids, -1)
    return (
        ids.reshape(shape),
        lps.reshape(shape),
        (counts > 0).reshape(shape),
        counts.reshape(shape),
    )


def test_sampled_ce_converges_to_full_cross_entropy():
    rng = np.random.default_rng(0)
    b, t, vocab = 4, 8, 200
    teacher = _log_softmax(rng.normal(scale=2.5, size=(b, t, vocab)))
    student = rng.normal(scale=2.0, size=(b, t, vocab)).astype(np.float32)
    log_q = _log_softmax(student)
    exact = float((np.exp(teacher) * -log_q).sum(-1).mean())  # sum_v p(v) (-log q(v))
    mask = jnp.ones((b, t))
    errors = {}
    for n_draws in (16, 20_000):
        ids, lps, valid, counts = _draw(rng, teacher, n_draws)
        args = dict(
            student_logits=jnp.asarray(student),
            ids=jnp.asarray(ids),
            teacher_logprobs=jnp.asarray(lps, jnp.float32),
            valid=jnp.asarray(valid),
            mask=mask,
        )
        for weights in ("probs", "counts"):
            loss, _ = sampled_ce(**args, weights=weights, counts=jnp.asarray(counts))
            errors[weights, n_draws] = abs(float(loss) - exact) / exact
    for weights in ("probs", "counts"):
        assert errors[weights, 20_000] < errors[weights, 16]
    assert errors["probs", 20_000] < 1e-3, errors  # only ids of mass < ~1e-4 go undrawn
    assert errors["counts", 20_000] < 1e-2, errors  # Monte-Carlo noise, ~1/sqrt(draws)


# ------------------------------------------------------------------------------------------------
# Gradients: hand-written VJPs against autodiff of the plain formulas; extreme inputs


def _naive_full(s, te, mask, temperature, divergence, beta=0.5):
    lq = jax.nn.log_softmax(s / temperature)
    lp = jax.nn.log_softmax(te / temperature)
    p, q = jnp.exp(lp), jnp.exp(lq)
    lm = jnp.log(beta * p + (1 - beta) * q)
    per = {
        "forward": (p * (lp - lq)).sum(-1),
        "reverse": (q * (lq - lp)).sum(-1),
        "jsd": beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(-1),
    }[divergence]
    return temperature**2 * (per * mask).sum() / mask.sum()


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_full_kl_gradients_match_autodiff(divergence):
    d = make_batch(6)
    s, te, mask = jnp.asarray(d["s"]), jnp.asarray(d["te"]), jnp.asarray(d["mask"])

    def ours(s, te):
        return full_kl(
            student_logits=s,
            teacher_logits=te,
            mask=mask,
            temperature=2.0,
            divergence=divergence,
            beta=0.3,
            vocab_chunk=4,
        )[0]

    got = jax.jit(jax.grad(ours, argnums=(0, 1)))(s, te)
    naive = jax.grad(lambda s, te: _naive_full(s, te, mask, 2.0, divergence, 0.3), (0, 1))
    want = jax.jit(naive)(s, te)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [None, 4])
def test_full_kl_mixed_with_hard_labels_gradients_match_autodiff(temperature, chunk):
    """alpha < 1 computes the hard-label CE inside full_kl's own passes: same gradient."""
    d = make_batch(6)
    s, te, mask = jnp.asarray(d["s"]), jnp.asarray(d["te"]), jnp.asarray(d["mask"])
    targets, alpha = jnp.asarray(d["targets"]), 0.3

    def ours(s, te):
        return distill_loss(
            kind="full_kl",
            alpha=alpha,
            student_logits=s,
            teacher_logits=te,
            mask=mask,
            hard_targets=targets,
            temperature=temperature,
            vocab_chunk=chunk,
        )[0]

    def naive(s, te):
        lq = jax.nn.log_softmax(s, -1)
        nll = -jnp.take_along_axis(lq, targets[..., None], -1)[..., 0]
        ce = (nll * mask).sum() / mask.sum()
        return alpha * _naive_full(s, te, mask, temperature, "forward", 0.5) + (1 - alpha) * ce

    got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(s, te)
    want = jax.jit(jax.value_and_grad(naive, argnums=(0, 1)))(s, te)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for g, w in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["sampled_ce", "topk_both", "topk_teacher_only"])
def test_sparse_gradients_match_autodiff(loss_name):
    d = make_batch(7)
    vocab = d["s"].shape[-1]
    temperature = 2.0
    valid, mask = jnp.asarray(d["valid"]), jnp.asarray(d["mask"])
    ids = jnp.where(valid, jnp.asarray(d["ids"]), 0)
    lp = jnp.asarray(d["lp"])

    def ours(s):
        args = dict(student_logits=s, ids=ids, teacher_logprobs=lp, valid=valid, mask=mask)
        if loss_name == "sampled_ce":
            return sampled_ce(**args, temperature=temperature, vocab_chunk=4)[0]
        renorm = "both" if loss_name == "topk_both" else "teacher_only"
        return topk_kl(**args, temperature=temperature, renormalize=renorm, vocab_chunk=4)[0]

    def naive(s):  # dense: teacher weights scattered onto the vocabulary with a one-hot
        onehot = jax.nn.one_hot(ids, vocab) * valid[..., None]
        a = jnp.where(valid, jnp.nan_to_num(lp, nan=0.0, neginf=0.0) / temperature, -jnp.inf)
        w = jnp.nan_to_num(jax.nn.softmax(a, -1))
        lq = jax.nn.log_softmax(s / temperature)
        lq_k = (onehot * lq[..., None, :]).sum(-1)
        if loss_name == "sampled_ce":
            per = -(w * lq_k).sum(-1)
        elif loss_name == "topk_both":
            sk = jnp.where(valid, (onehot * s[..., None, :]).sum(-1) / temperature, -1e30)
            lqn = jnp.where(valid, jax.nn.log_softmax(sk, -1), 0.0)
            per = (w * (jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), 0.0) - lqn)).sum(-1)
        else:
            p_top = jnp.where(valid, jnp.exp(jnp.nan_to_num(lp, nan=-jnp.inf)), 0.0)
            miss = 1 - p_top.sum(-1)
            others = vocab - valid.sum(-1)
            tail = others * (miss / others) ** (1 / temperature)
            pw = jnp.concatenate([p_top ** (1 / temperature), tail[..., None]], -1)
            pw = pw / pw.sum(-1, keepdims=True)
            lqt = jnp.concatenate(
                [lq_k, jnp.log1p(-(jnp.exp(lq_k) * valid).sum(-1))[..., None]], -1
            )
            logp = jnp.log(jnp.where(pw > 0, pw, 1.0))
            per = jnp.where(pw > 0, pw * (logp - lqt), 0.0).sum(-1)
        return temperature**2 * (per * mask).sum() / mask.sum()

    s = jnp.asarray(d["s"])
    (value, grad), (want_value, want_grad) = (
        jax.jit(jax.value_and_grad(f))(s) for f in (ours, naive)
    )
    np.testing.assert_allclose(float(value), float(want_value), rtol=RTOL)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(want_grad), rtol=1e-4, atol=1e-6)


def _extreme_inputs():
    """Logits at +-1e4, all teacher mass on one id, -inf in padded slots and on a valid id."""
    b, t, vocab, k = 2, 3, 17, 4
    rng = np.random.default_rng(8)
    s = np.where(rng.random((b, t, vocab)) < 0.5, 1e4, -1e4).astype(np.float32)
    te = np.full((b, t, vocab), -1e4, np.float32)
    te[..., 3] = 1e4  # the teacher is sure of id 3
    ids = np.broadcast_to(np.array([3, 5, 0, 9], np.int32), (b, t, k)).copy()
    lp = np.broadcast_to(np.array([0.0, -np.inf, -np.inf, -np.inf], np.float32), (b, t, k)).copy()
    valid = np.broadcast_to(np.array([True, True, False, False]), (b, t, k)).copy()
    mask = np.ones((b, t), np.float32)
    return s, te, ids, lp, valid, mask


@pytest.mark.parametrize("chunk", [None, 5])
def test_gradients_finite_for_extreme_inputs(chunk):
    s, te, ids, lp, valid, mask = map(jnp.asarray, _extreme_inputs())
    sparse = dict(ids=ids, valid=valid, mask=mask, vocab_chunk=chunk)
    counts = jnp.where(valid, 7, 0)
    losses = {
        "sampled_ce": lambda s, lp, te: sampled_ce(
            student_logits=s, teacher_logprobs=lp, temperature=2.0, **sparse
        ),
        "sampled_ce_counts": lambda s, lp, te: sampled_ce(
            student_logits=s, teacher_logprobs=lp, weights="counts", counts=counts, **sparse
        ),
        "topk_both": lambda s, lp, te: topk_kl(
            student_logits=s, teacher_logprobs=lp, temperature=2.0, **sparse
        ),
        "topk_teacher_only": lambda s, lp, te: topk_kl(
            student_logits=s,
            teacher_logprobs=lp,
            temperature=2.0,
            renormalize="teacher_only",
            **sparse,
        ),
    }
    for div in ("forward", "reverse", "jsd"):
        losses[f"full_{div}"] = lambda s, lp, te, div=div: full_kl(
            student_logits=s,
            teacher_logits=te,
            mask=mask,
            temperature=2.0,
            divergence=div,
            vocab_chunk=chunk,
        )
    for name, fn in losses.items():
        value_and_grad = jax.jit(jax.value_and_grad(lambda *a, fn=fn: fn(*a)[0], argnums=(0, 1, 2)))
        loss, grads = value_and_grad(s, lp, te)
        assert np.isfinite(float(loss)), name
        for g in grads:
            assert np.isfinite(np.asarray(g)).all(), name


# ------------------------------------------------------------------------------------------------
# Chunking: same numbers, less memory


def test_chunked_equals_unchunked():
    """Vocabulary 13 in chunks of 4 (a scan plus a remainder) and of 1 (a scan only)."""
    d = make_batch(9)
    sparse = _sparse_args(d)
    counts = jnp.asarray(d["counts"])
    te, mask = jnp.asarray(d["te"]), jnp.asarray(d["mask"])
    fns = {
        "sampled_ce": lambda s, c: sampled_ce(
            **{**sparse, "student_logits": s}, temperature=2.0, vocab_chunk=c
        ),
        "sampled_ce_counts": lambda s, c: sampled_ce(
            **{**sparse, "student_logits": s}, weights="counts", counts=counts, vocab_chunk=c
        ),
        "topk_teacher_only": lambda s, c: topk_kl(
            **{**sparse, "student_logits": s}, renormalize="teacher_only", vocab_chunk=c
        ),
        "distill_alpha": lambda s, c: distill_loss(
            kind="topk_kl",
            alpha=0.5,
            hard_targets=jnp.asarray(d["targets"]),
            vocab_chunk=c,
            **{**sparse, "student_logits": s},
        ),
        "distill_alpha_full": lambda s, c: distill_loss(
            kind="full_kl",
            alpha=0.5,
            temperature=2.0,
            hard_targets=jnp.asarray(d["targets"]),
            vocab_chunk=c,
            student_logits=s,
            teacher_logits=te,
            mask=mask,
        ),
        **{
            f"full_{div}": (
                lambda s, c, div=div: full_kl(
                    student_logits=s, teacher_logits=te, mask=mask, divergence=div, vocab_chunk=c
                )
            )
            for div in ("forward", "reverse", "jsd")
        },
    }
    s = jnp.asarray(d["s"])
    for name, fn in fns.items():
        value_and_grad = jax.jit(jax.value_and_grad(fn, has_aux=True), static_argnums=1)
        (l0, m0), g0 = value_and_grad(s, None)
        for chunk in (4, 1):
            (l1, m1), g1 = value_and_grad(s, chunk)
            np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(float(m1["kl_sum"]), float(m0["kl_sum"]), rtol=1e-6)
            # gradient entries are O(0.1): 1e-6 absolute is a few float32 ulps of the normaliser
            np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=1e-6, err_msg=name)


def _temp_bytes(fn, *shapes):
    return jax.jit(fn).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


def test_chunked_memory_is_bounded_at_vocab_65536():
    """Compiled temporaries (XLA's memory analysis, no execution) at vocab 65536: with chunks
    no [batch, seq, vocab] float32 temporary is kept, in the forward pass or the gradient."""
    b, t, vocab, k, chunk = 2, 128, 65536, 64, 4096
    full_tensor = b * t * vocab * 4
    logits = jax.ShapeDtypeStruct((b, t, vocab), jnp.float32)
    mask = jax.ShapeDtypeStruct((b, t), jnp.float32)
    sparse = (
        jax.ShapeDtypeStruct((b, t, k), jnp.int32),
        jax.ShapeDtypeStruct((b, t, k), jnp.float32),
        jax.ShapeDtypeStruct((b, t, k), jnp.bool_),
    )
    for div in ("forward", "reverse", "jsd"):

        def f(s, te, m, c, div=div):
            kw = dict(divergence=div, temperature=2.0, vocab_chunk=c)
            return full_kl(student_logits=s, teacher_logits=te, mask=m, **kw)[0]

        for transform in (lambda g: g, jax.grad):
            unchunked = _temp_bytes(
                transform(lambda s, te, m: f(s, te, m, None)), logits, logits, mask
            )
            chunked = _temp_bytes(
                transform(lambda s, te, m: f(s, te, m, chunk)), logits, logits, mask
            )
            assert chunked < unchunked, (div, chunked, unchunked)
            assert chunked <= full_tensor // 4, (div, chunked)

    def g(s, ids, lp, v, m):
        kw = dict(ids=ids, teacher_logprobs=lp, valid=v, mask=m, vocab_chunk=chunk)
        return sampled_ce(student_logits=s, **kw)[0]

    # One logsumexp is fused by XLA either way; chunking only bounds it by construction.
    for transform in (lambda g: g, jax.grad):
        assert _temp_bytes(transform(g), logits, *sparse, mask) <= full_tensor // 4


def test_bfloat16_logits_are_read_in_float32():
    d = make_batch(10)
    sparse = _sparse_args(d)
    s16 = sparse["student_logits"].astype(jnp.bfloat16)

    def loss(s):
        return sampled_ce(**{**sparse, "student_logits": s}, vocab_chunk=4)[0]

    value, grad = jax.value_and_grad(loss)(s16)
    assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(value), float(loss(s16.astype(jnp.float32))), rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Argument errors


def test_bad_arguments_raise():
    d = make_batch()
    sparse = _sparse_args(d)
    with pytest.raises(ValueError, match="counts"):
        sampled_ce(**sparse, weights="counts")
    with pytest.raises(ValueError, match="weights"):
        sampled_ce(**sparse, weights="logits")
    with pytest.raises(ValueError, match="temperature"):
        sampled_ce(**sparse, temperature=0.0)
    with pytest.raises(ValueError, match="vocab_chunk"):
        sampled_ce(**sparse, vocab_chunk=0)
    with pytest.raises(ValueError, match="renormalize"):
        topk_kl(**sparse, renormalize="student")
    full = dict(
        student_logits=sparse["student_logits"],
        teacher_logits=jnp.asarray(d["te"]),
        mask=sparse["mask"],
    )
    with pytest.raises(ValueError, match="beta"):
        full_kl(**full, divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="divergence"):
        full_kl(**full, divergence="tvd")
    with pytest.raises(ValueError, match="unknown distillation loss"):
        distill_loss(kind="kl", alpha=1.0, **full)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(kind="full_kl", alpha=1.5, **full)
    with pytest.raises(ValueError, match="hard_targets"):
        distill_loss(kind="full_kl", alpha=0.5, **full)
