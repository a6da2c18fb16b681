"""Independent float64 numpy implementations used as test oracles.

Written as plainly as possible from REFERENCE §2–3 (explicit loops, no shared
code with the library) so that a bug would have to be made twice.
"""

import numpy as np

CUBIC = (1.5, -0.5, 0.0)


def newton_schulz(c, steps):
    """NS with a list of (a, b, c) per iteration, on one d x d matrix."""
    x = np.asarray(c, np.float64)
    x = x / max(np.linalg.norm(x), 1e-6)
    for a, b, cc in steps:
        g = x.T @ x
        x = a * x + b * x @ g + cc * x @ g @ g
    return x


def polar(c, rtol=2.0**-11.5):
    u, s, vt = np.linalg.svd(np.asarray(c, np.float64))
    keep = s > s.max() * rtol if s.max() > 0 else np.zeros_like(s, bool)
    return (u * keep) @ vt


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def mlstm_recurrence(q, k, v, igate, fgate, read, reset=None, state=None):
    """q, k, v (B, T, H, d); gates (B, T, H); read maps a d x d matrix.

    Returns h (B, T, H, d) and the final (C, n, m).
    """
    q, k, v, igate, fgate = (np.asarray(a, np.float64) for a in (q, k, v, igate, fgate))
    b, t, h, d = q.shape
    if state is None:
        c, n, m = np.zeros((b, h, d, d)), np.zeros((b, h, d)), np.zeros((b, h))
    else:
        c, n, m = (np.array(a, np.float64) for a in state)
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for ti in range(t):
            if reset is not None and reset[bi, ti]:
                c[bi], n[bi], m[bi] = 0.0, 0.0, 0.0
            for hi in range(h):
                log_f = log_sigmoid(fgate[bi, ti, hi])
                m_new = max(log_f + m[bi, hi], igate[bi, ti, hi])
                f_ = np.exp(log_f + m[bi, hi] - m_new)
                i_ = np.exp(igate[bi, ti, hi] - m_new)
                kh = k[bi, ti, hi] / np.sqrt(d)
                c[bi, hi] = f_ * c[bi, hi] + i_ * np.outer(kh, v[bi, ti, hi])
                n[bi, hi] = f_ * n[bi, hi] + i_ * kh
                m[bi, hi] = m_new
                qt = q[bi, ti, hi]
                denom = max(abs(qt @ n[bi, hi]), np.exp(-m_new)) + 1e-6
                out[bi, ti, hi] = (qt @ read(c[bi, hi])) / denom
    return out, (c, n, m)


def mlstm_variant_recurrence(
    q, k, v, igate, fgate, read, *, write="additive", ridge=None, reset=None
):
    """The replication's mechanism variants in float64, computed in the true
    (unstabilized) scale and converted at each read: an independent form of
    ``orthorecall.mlstm``'s stabilized recurrence.

    write: "additive" (C = f C + e^ĩ k̂vᵀ) or "delta" (C = f (I − k̂k̂ᵀ) C + e^ĩ k̂vᵀ).
    ridge: None, or λ of the whitened (rls) read: the query becomes P q with
    P = (λ Π f I + Σ w k̂k̂ᵀ)⁻¹ (explicit inverse), the weights w those of C.

    Returns h (B, T, H, d).
    """
    q, k, v, igate, fgate = (np.asarray(a, np.float64) for a in (q, k, v, igate, fgate))
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            c, n, m = np.zeros((d, d)), np.zeros(d), 0.0
            key_covariance = np.zeros((d, d))
            ridge_weight = 1.0  # Π f since the episode started
            for ti in range(t):
                if reset is not None and reset[bi, ti]:
                    c, n, m = np.zeros((d, d)), np.zeros(d), 0.0
                    key_covariance, ridge_weight = np.zeros((d, d)), 1.0
                f = np.exp(log_sigmoid(fgate[bi, ti, hi]))
                i = np.exp(igate[bi, ti, hi])
                m = max(np.log(f) + m, igate[bi, ti, hi])
                kh = k[bi, ti, hi] / np.sqrt(d)
                if write == "delta":
                    c = c - np.outer(kh, kh @ c)
                c = f * c + i * np.outer(kh, v[bi, ti, hi])
                n = f * n + i * kh
                key_covariance = f * key_covariance + i * np.outer(kh, kh)
                ridge_weight *= f
                query = q[bi, ti, hi]
                if ridge is not None:
                    query = np.linalg.solve(
                        ridge * ridge_weight * np.eye(d) + key_covariance, query
                    )
                scale = np.exp(-m)  # to the stabilized scale the layer reads in
                denom = max(abs(query @ n) * scale, scale) + 1e-6
                out[bi, ti, hi] = (query @ read(c * scale)) / denom
    return out


def assert_directional_derivative(f64, x, gradient, seed, eps=1e-5, tolerance=2e-3):
    """That ``gradient`` (of a float32 function at ``x``) agrees with the central
    difference of the float64 function ``f64`` along a random direction."""
    x = np.asarray(x, np.float64)
    direction = np.random.default_rng(seed).standard_normal(x.shape)
    want = (f64(x + eps * direction) - f64(x - eps * direction)) / (2 * eps)
    got = float(np.sum(np.asarray(gradient, np.float64) * direction))
    assert abs(got - want) < tolerance * max(1.0, abs(want)), (got, want)
