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
