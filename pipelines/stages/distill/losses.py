"""The distillation losses: KD divergences (on full or precomputed top-k teacher logits), the
hidden-state loss, and their weighted sum on one batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llmopt.recipe import DistillLoss


def kd_loss(student_logits, teacher_logits, kind: str, temperature: float, beta: float = 0.5, mask=None):
    """Mean per-token divergence between teacher p and student q at `temperature` (over the tokens
    where `mask` is true), times T^2 so the gradient scale does not shrink with T (Hinton et al.).
    See DistillLoss for the directions."""
    import torch
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        per_token = (beta * (log_p.exp() * (log_p - log_m)).sum(-1)
                     + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1))
    return _masked_mean(per_token, mask) * temperature**2


def kd_loss_topk(student_logits, values, indices, temperature: float, mask=None):
    """Forward KL from the teacher's top-k (its logits `values` at vocabulary `indices`,
    renormalised over those k at `temperature`) to the student, times T^2. With k = the vocabulary
    size this is exactly forward KL; with less it ignores the teacher's mass outside its top k."""
    import torch.nn.functional as F

    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, indices.long())
    log_p = F.log_softmax(values.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def hidden_loss(student_hidden, teacher_hidden, kind: str, mask=None):
    """Per-position MSE (mean over the hidden dimension) or 1 - cosine, averaged where `mask` is true."""
    import torch.nn.functional as F

    s, t = student_hidden.float(), teacher_hidden.float()
    per_position = ((s - t) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)
    return _masked_mean(per_position, mask)


def _masked_mean(values, mask):
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


@dataclass(frozen=True)
class TeacherOutput:
    """What the teacher gives for a batch: its logits (and hidden states), or its precomputed
    top-k logits as (values, indices)."""

    logits: Any = None
    hidden_states: Any = None
    topk: tuple | None = None


def distill_loss(loss: DistillLoss, s_logits, s_hidden: dict, t_out: TeacherOutput, ids, mask, layer_map: dict) -> dict:
    """The loss components on one batch; padding (mask 0) counts nowhere. `s_hidden`: the mapped
    student layers' hidden states, already projected to the teacher's width."""
    import torch
    import torch.nn.functional as F

    zero = torch.zeros((), device=ids.device)
    s_logits = s_logits[:, :-1]
    predicts_real_token = mask[:, 1:].bool()  # position p predicts token p + 1
    parts = {"kd": zero, "ce": zero, "hidden": zero}
    if loss.kd_weight and t_out.topk is not None:
        values, indices = t_out.topk
        parts["kd"] = kd_loss_topk(s_logits, values[:, :-1], indices[:, :-1], loss.temperature, predicts_real_token)
    elif loss.kd_weight:
        parts["kd"] = kd_loss(s_logits, t_out.logits[:, :-1], loss.kd, loss.temperature, loss.jsd_beta,
                              predicts_real_token)
    if loss.ce_weight:
        labels = ids[:, 1:].masked_fill(~predicts_real_token, -100)
        parts["ce"] = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(), labels.reshape(-1))
    if loss.hidden_weight and layer_map:
        terms = [hidden_loss(s_hidden[s], t_out.hidden_states[t + 1], loss.hidden_loss, mask.bool())
                 for s, t in layer_map.items()]  # hidden_states[0] is the embedding output
        parts["hidden"] = torch.stack(terms).mean()
    parts["total"] = loss.kd_weight * parts["kd"] + loss.ce_weight * parts["ce"] + loss.hidden_weight * parts["hidden"]
    return parts
