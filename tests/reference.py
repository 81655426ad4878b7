"""Independent NumPy references written from the papers' formulas (float64)."""

import numpy as np


def log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def kl(p_log, q_log):
    p = np.exp(p_log)
    return np.where(p > 0, p * (p_log - q_log), 0.0).sum(-1)


def divergence(name, t, s):
    """D(teacher || student) on already temperature-scaled logits."""
    tl, sl = log_softmax(t), log_softmax(s)
    if name == "kl":
        return kl(tl, sl)
    if name == "reverse_kl":
        return kl(sl, tl)
    if name == "js":
        m = np.log(0.5 * (np.exp(tl) + np.exp(sl)))
        return 0.5 * kl(tl, m) + 0.5 * kl(sl, m)
    if name == "soft_cross_entropy":
        return -(np.exp(tl) * sl).sum(-1)
    if name == "mse":
        return ((np.asarray(s, np.float64) - t) ** 2).mean(-1)
    if name == "huber":
        e = np.abs(np.asarray(s, np.float64) - t)
        return np.where(e <= 1.0, 0.5 * e**2, e - 0.5).mean(-1)
    raise KeyError(name)


def sparse_ce(labels, logits):
    lp = log_softmax(logits)
    return -np.take_along_axis(lp, np.asarray(labels)[..., None], -1)[..., 0]


def distillation_loss(labels, student, teacher, T, alpha, name="kl", weights=None, mask=None, t2=True):
    """Reference total: mean over (unmasked) positions of weighted per-position values."""
    hard = sparse_ce(labels, student)
    soft = divergence(name, np.asarray(teacher, np.float64) / T, np.asarray(student, np.float64) / T)
    if t2:
        soft = soft * T * T
    values = alpha * hard + (1 - alpha) * soft
    w = np.ones_like(values) if weights is None else np.broadcast_to(np.asarray(weights, np.float64), values.shape)
    if mask is not None:
        w = w * mask
        return (values * w).sum() / mask.sum()
    return (values * w).sum() / values.size


def log_sigmoid(z):
    z = np.asarray(z, np.float64)
    return -np.logaddexp(0.0, -z)


def bernoulli_kl(t, s):
    """KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))) per element, t and s already divided by T."""
    p, log_p, log_1p = 1.0 / (1.0 + np.exp(-np.asarray(t, np.float64))), log_sigmoid(t), log_sigmoid(-np.asarray(t))
    log_q, log_1q = log_sigmoid(s), log_sigmoid(-np.asarray(s, np.float64))
    return p * (log_p - log_q) + (1.0 - p) * (log_1p - log_1q)


def binary_ce(labels, logits):
    """-(y log sigmoid(z) + (1 - y) log sigmoid(-z)) per element."""
    y = np.asarray(labels, np.float64)
    return -(y * log_sigmoid(logits) + (1.0 - y) * log_sigmoid(-np.asarray(logits, np.float64)))


def binary_distillation_loss(labels, student, teacher, T, alpha):
    """One-logit students: alpha * BCE + (1 - alpha) * T^2 * Bernoulli KL, mean over examples.

    ``student``/``teacher`` have shape (batch, 1); labels (batch,)."""
    s, t = np.asarray(student, np.float64)[..., 0], np.asarray(teacher, np.float64)[..., 0]
    values = alpha * binary_ce(labels, s) + (1 - alpha) * T * T * bernoulli_kl(t / T, s / T)
    return values.mean()


def bernoulli_entropy(t):
    """Entropy of Bernoulli(sigmoid(t)) per element."""
    t = np.asarray(t, np.float64)
    p = 1.0 / (1.0 + np.exp(-t))
    return -(p * log_sigmoid(t) + (1.0 - p) * log_sigmoid(-t))
