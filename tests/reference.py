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
        m = np.logaddexp(tl, sl) - np.log(2.0)  # log of the mixture, without underflow to log(0)
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


def softmax(z):
    return np.exp(log_softmax(z))


def decoupled_kd(labels, student, teacher, T, target_weight=1.0, non_target_weight=8.0):
    """DKD per example, from Zhao et al. (CVPR 2022), eq. (6)-(7), in probability space (float64).

    ``T^2 * (target_weight * TCKD + non_target_weight * NCKD)`` with
    TCKD = KL(b_t || b_s), b = [p_gt, 1 - p_gt], and NCKD = KL(p_hat_t || p_hat_s),
    p_hat_c = p_c / (1 - p_gt) over the classes c != gt.
    """
    labels = np.asarray(labels)
    p_t = softmax(np.asarray(teacher, np.float64) / T)
    p_s = softmax(np.asarray(student, np.float64) / T)
    out = np.zeros(len(labels))
    for i, g in enumerate(labels):
        bt = np.array([p_t[i, g], 1.0 - p_t[i, g]])
        bs = np.array([p_s[i, g], 1.0 - p_s[i, g]])
        tckd = np.sum(bt * np.log(bt / bs))
        rest = np.arange(p_t.shape[1]) != g
        ht = p_t[i, rest] / p_t[i, rest].sum()
        hs = p_s[i, rest] / p_s[i, rest].sum()
        nckd = np.sum(ht * np.log(ht / hs))
        out[i] = T * T * (target_weight * tckd + non_target_weight * nckd)
    return out


def categorical_ce(dense_labels, logits):
    """-sum_c y_c log softmax(z)_c per example (dense one-hot or mixed labels)."""
    return -(np.asarray(dense_labels, np.float64) * log_softmax(logits)).sum(-1)


def kd_gradient(labels, student, teacher, T, alpha, coef, dense_labels=None, labelled=None):
    """d loss / d student logits for alpha * CE + (1 - alpha) * T^2 * KL, loss = sum_i coef_i * value_i.

    Closed form (Hinton et al. 2015): dCE/ds = softmax(s) - y, d(T^2 KL)/ds = T (softmax(s/T) - softmax(t/T)).
    ``labelled`` (0/1 per example) zeroes the CE part of unlabelled examples.
    """
    s = np.asarray(student, np.float64)
    n, k = s.shape
    y = np.asarray(dense_labels, np.float64) if dense_labels is not None else np.eye(k)[np.asarray(labels)]
    hard = softmax(s) * y.sum(-1, keepdims=True) - y
    if labelled is not None:
        hard = hard * np.asarray(labelled, np.float64)[:, None]
    soft = T * (softmax(s / T) - softmax(np.asarray(teacher, np.float64) / T))
    coef = np.broadcast_to(np.asarray(coef, np.float64), (n,))[:, None]
    return coef * (alpha * hard + (1 - alpha) * soft)


# ---------------------------------------------------------------------------
# Feature losses of keras_kd.alignment (per example), float64
# ---------------------------------------------------------------------------


def _flat_features(a):
    a = np.asarray(a, np.float64)
    return a.reshape(len(a), -1)


def feature_mse(t, s):
    """FitNets hint loss per example: mean_j (s_j - t_j)^2."""
    return ((_flat_features(s) - _flat_features(t)) ** 2).mean(axis=1)


def feature_l1(t, s):
    """mean_j |s_j - t_j| per example."""
    return np.abs(_flat_features(s) - _flat_features(t)).mean(axis=1)


def feature_cosine(t, s):
    """1 - cos(s, t) of the flattened features; an all-zero row counts as orthogonal."""
    s, t = _flat_features(s), _flat_features(t)
    ns, nt = np.linalg.norm(s, axis=1), np.linalg.norm(t, axis=1)
    dot = (s * t).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((ns > 0) & (nt > 0), dot / (ns * nt), 0.0)
    return 1.0 - cos


def attention_map(f, p=2.0):
    """Zagoruyko & Komodakis 2017: vec(sum_c |f|^p), L2-normalised per example."""
    a = (np.abs(np.asarray(f, np.float64)) ** p).sum(axis=-1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def attention_transfer(t, s, p=2.0):
    """mean_j (a_s[j] - a_t[j])^2 per example (the authors' code)."""
    return ((attention_map(s, p) - attention_map(t, p)) ** 2).mean(axis=1)
