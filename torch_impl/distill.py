"""Distillation in PyTorch (taichu/distill.py, design.md §2.4), mirrored by
mindspore_impl/distill.py.

A Distiller holds the student, the frozen teacher (evaluation mode, no gradients) and per
stream the projections W_e, W_h from the student's width to the teacher's. Both models go
through their family's ``distill_outputs`` (one forward pass each: the family's own loss,
prediction logits, and per stream hidden states and attention scores); ``training_loss``
is the trainer's objective, ``(total,)`` plus the student loss's extra outputs for the
family's ``after_step``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from taichu.families import backend_module, get_family


class StreamProjection(nn.Module):
    """W_e (embeddings) and W_h (every mapped layer's hidden states, one matrix as in
    TinyBERT) of one stream, without bias; none when student and teacher widths agree.
    Initialised by taichu.distill.initial_projections (numpy: the same in both backends)."""

    def __init__(self, plan):
        super().__init__()
        projected = plan.student_width != plan.teacher_width
        self.embedding = nn.Linear(plan.student_width, plan.teacher_width, bias=False) if projected else None
        self.hidden = nn.Linear(plan.student_width, plan.teacher_width, bias=False) if projected else None

    def project_embedding(self, x):
        return x if self.embedding is None else self.embedding(x)

    def project_hidden(self, x):
        return x if self.hidden is None else self.hidden(x)


class Distiller(nn.Module):
    def __init__(self, student, teacher, plans, temperature: float):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.projections = nn.ModuleList([StreamProjection(plan) for plan in plans])
        # The plans as plain tuples (what a compiled graph reads): per stream the teacher
        # layer of each student layer, teacher heads per student head, causal or not.
        self.layer_maps = tuple(tuple(plan.layer_map) for plan in plans)
        self.head_groups = tuple(plan.head_group for plan in plans)
        self.causal = tuple(plan.causal for plan in plans)
        self.temperature = float(temperature)
        family_module = backend_module(get_family(student.config.family), "torch")
        self.family_outputs = family_module.distill_outputs
        self.student_after_step = getattr(family_module, "after_step", None)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        # The teacher stays in evaluation mode (no dropout) whatever the student does.
        super().train(mode)
        self.teacher.eval()
        return self


def token_mse(student, teacher, token_mask):
    """Mean over real tokens (token_mask [B, L], 1 = real) and the width of (s - t)^2."""
    weight = token_mask / token_mask.sum()
    return ((student - teacher).pow(2).mean(dim=-1) * weight).sum()


def pair_mask(token_mask, causal: bool):
    """[B, 1, L, L]: 1 where query and key are both real tokens (and, causal, the key is not
    after the query): the attention scores the model actually uses."""
    length = token_mask.shape[1]
    pairs = token_mask.unsqueeze(1).unsqueeze(3) * token_mask.unsqueeze(1).unsqueeze(2)
    if causal:
        pairs = pairs * torch.tril(torch.ones(length, length, dtype=pairs.dtype, device=pairs.device))
    return pairs


def score_mse(student, teacher, pairs):
    """Mean over heads and the used (query, key) pairs of (s - t)^2; scores [B, H, L, L]."""
    weight = pairs / (pairs.sum() * student.shape[1])
    return ((student - teacher).pow(2) * weight).sum()


def group_heads(scores, group: int):
    """[B, H_t, L, L] -> [B, H_t / group, L, L]: each run of ``group`` teacher heads averaged."""
    if group == 1:
        return scores
    batch, heads, queries, keys = scores.shape
    return scores.view(batch, heads // group, group, queries, keys).mean(dim=2)


def soft_cross_entropy(student_logits, teacher_logits, row_weight, temperature: float):
    """sum_r w_r * -sum_c softmax(z_T / t)_c log softmax(z_S / t)_c over logits [rows, classes]."""
    target = F.softmax(teacher_logits / temperature, dim=-1)
    log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    return (-(target * log_probs).sum(dim=-1) * row_weight).sum()


def kd_terms(model, student_predictions, student_streams, teacher_predictions, teacher_streams):
    """(embedding, hidden, attention, prediction) losses; hidden and attention summed over
    the mapped layers, every term summed over streams and prediction heads."""
    zero = torch.zeros((), device=student_predictions[0][0].device)
    embedding, hidden, attention, prediction = zero, zero, zero, zero
    for i in range(len(model.layer_maps)):
        projection = model.projections[i]
        s_hidden, s_scores, token_mask, _ = student_streams[i]
        t_hidden, t_scores, _, _ = teacher_streams[i]
        token_mask = token_mask.float()
        pairs = pair_mask(token_mask, model.causal[i])
        embedding = embedding + token_mse(projection.project_embedding(s_hidden[0]).float(),
                                          t_hidden[0].float(), token_mask)
        for m, g in enumerate(model.layer_maps[i]):
            hidden = hidden + token_mse(projection.project_hidden(s_hidden[m + 1]).float(),
                                        t_hidden[g].float(), token_mask)
            attention = attention + score_mse(s_scores[m].float(),
                                              group_heads(t_scores[g - 1].float(), model.head_groups[i]), pairs)
    for (s_logits, row_weight), (t_logits, _) in zip(student_predictions, teacher_predictions):
        prediction = prediction + soft_cross_entropy(s_logits.float(), t_logits.float(), row_weight,
                                                     model.temperature)
    return embedding, hidden, attention, prediction


def training_loss(model, weights, *inputs):
    """(a1 * L_kd + a2 * L_student, *the student loss's extra outputs); ``weights`` is the
    step's taichu.distill.WEIGHT_NAMES vector, ``inputs`` the student family's batch."""
    student_loss, student_predictions, student_streams = model.family_outputs(model.student, *inputs)
    with torch.no_grad():
        _, teacher_predictions, teacher_streams = model.family_outputs(model.teacher, *inputs)
    embedding, hidden, attention, prediction = kd_terms(model, student_predictions, student_streams,
                                                        teacher_predictions, teacher_streams)
    kd = weights[0] * embedding + weights[1] * hidden + weights[2] * attention + weights[3] * prediction
    total = weights[4] * kd + weights[5] * student_loss[0].float()
    return (total,) + tuple(student_loss[1:])


def after_step(model, *outputs):
    """The student family's after_step (CLIP clamps its temperature)."""
    if model.student_after_step is not None:
        model.student_after_step(model.student, *outputs)


@torch.no_grad()
def load_projections(model, arrays: dict) -> None:
    """The projections of a checkpoint (canonical names ``projections.i.{embedding,hidden}.weight``),
    all checked before any is written."""
    params = {f"projections.{name}": p for name, p in model.projections.named_parameters()}
    if set(params) != set(arrays):
        raise ValueError(f"distillation projections differ from the checkpoint's: missing "
                         f"{sorted(set(params) - set(arrays))}, unexpected {sorted(set(arrays) - set(params))}")
    for name, param in params.items():
        if tuple(arrays[name].shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {arrays[name].shape} does not fit {tuple(param.shape)}")
    for name, param in params.items():
        param.copy_(torch.from_numpy(arrays[name]))
