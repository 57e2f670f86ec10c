"""TinyBERT's distillation losses in numpy float64, written from the paper's equations
(Jiao et al. 2020, eq. 7-12; design.md §2.4), independent of the backends' code: the
oracle the loss terms of torch_impl/distill.py and mindspore_impl/distill.py are held to.

Streams and predictions have the layout of ``distill_outputs`` (torch_impl/gpt.py): per
stream (hidden states h_0..h_M, attention scores a_1..a_M, token mask, causal), per
prediction head (logits [rows, classes], row weights).
"""
import numpy as np


def _mse_over_tokens(student, teacher, mask):
    """(1 / (n_real * d)) * sum over real tokens and features of (s - t)^2."""
    squared = (student - teacher) ** 2                      # [B, L, d]
    return float((squared.sum(axis=-1) * mask).sum() / (mask.sum() * student.shape[-1]))


def _mse_over_scores(student, teacher, mask, causal):
    """(1 / (h * n_pairs)) * sum over heads and the used (query, key) pairs of (s - t)^2."""
    batch, heads, length, _ = student.shape
    total, pairs = 0.0, 0
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                if mask[b, q] and mask[b, k] and (not causal or k <= q):
                    total += float(((student[b, :, q, k] - teacher[b, :, q, k]) ** 2).sum())
                    pairs += 1
    return total / (pairs * heads)


def _soft_cross_entropy(student, teacher, weights, temperature):
    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    target = np.exp(log_softmax(teacher / temperature))
    return float((-(target * log_softmax(student / temperature)).sum(axis=-1) * weights).sum())


def reference_terms(plans, projections, temperature, student_predictions, student_streams,
                    teacher_predictions, teacher_streams):
    """(embedding, hidden, attention, prediction) in float64.

    ``projections``: {stream index: (W_e, W_h)} in torch's [out, in] layout, for the streams
    whose widths differ. Teacher heads are averaged in groups of plan.head_group.
    """
    f64 = lambda x: np.asarray(x, np.float64)
    embedding = hidden = attention = prediction = 0.0
    for i, plan in enumerate(plans):
        s_hidden, s_scores, mask, causal = student_streams[i]
        t_hidden, t_scores, _, _ = teacher_streams[i]
        w_e, w_h = projections.get(i, (None, None))
        project = lambda x, w: f64(x) if w is None else f64(x) @ f64(w).T
        mask = f64(mask)
        embedding += _mse_over_tokens(project(s_hidden[0], w_e), f64(t_hidden[0]), mask)
        for m, g in enumerate(plan.layer_map, start=1):
            hidden += _mse_over_tokens(project(s_hidden[m], w_h), f64(t_hidden[g]), mask)
            teacher = f64(t_scores[g - 1])
            b, h, l, _ = teacher.shape
            teacher = teacher.reshape(b, h // plan.head_group, plan.head_group, l, l).mean(axis=2)
            attention += _mse_over_scores(f64(s_scores[m - 1]), teacher, mask, plan.causal)
    for (s_logits, weights), (t_logits, _) in zip(student_predictions, teacher_predictions):
        prediction += _soft_cross_entropy(f64(s_logits), f64(t_logits), f64(weights), temperature)
    return embedding, hidden, attention, prediction
