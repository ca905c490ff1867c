"""The student: an existing model, or derived from the teacher (a subset of its layers, weights
copied; or narrower, randomly initialised), and which of its layers match which teacher layers."""

from __future__ import annotations

from llmopt.cache import Artifact
from llmopt.models import load_model, load_tokenizer, tokenizer_mismatch
from llmopt.recipe import DistillLoss, StudentSpec
from llmopt.stages import StageContext


def build_student(spec: StudentSpec, teacher, tokenizer, ctx: StageContext, existing: Artifact | None = None):
    """(student, kept teacher layers or None). `existing`: the resolved `spec.model`. A derived
    student copies the kept layers' weights, embeddings, final norm and head when its widths
    equal the teacher's; narrower is random init."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if spec.model is not None:
        raise_on_tokenizer_mismatch(tokenizer, load_tokenizer(existing.path, ctx.trust_remote_code))
        return load_model(existing, ctx.device, "float32", ctx.trust_remote_code), None

    n = teacher.config.num_hidden_layers
    kept = list(range(0, n, 2)) if spec.keep_layers == "every_other" else list(spec.keep_layers)
    if max(kept) >= n:
        raise ValueError(f"student.keep_layers: layer {max(kept)} is out of range, the teacher has {n} layers (0-{n - 1})")
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(kept)
    narrower = bool(spec.hidden_size and spec.hidden_size != config.hidden_size) or bool(
        spec.intermediate_size and spec.intermediate_size != config.intermediate_size)
    if spec.hidden_size:
        if spec.hidden_size % config.num_attention_heads:
            raise ValueError(f"student.hidden_size {spec.hidden_size} is not a multiple of the "
                             f"{config.num_attention_heads} attention heads")
        config.hidden_size = spec.hidden_size
        config.head_dim = spec.hidden_size // config.num_attention_heads
    if spec.intermediate_size:
        config.intermediate_size = spec.intermediate_size
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if not narrower:
        teacher_state = teacher.state_dict()
        layer_prefix = "model.layers."
        new_state = {}
        for name in student.state_dict():
            if name.startswith(layer_prefix):
                index, rest = name[len(layer_prefix):].split(".", 1)
                new_state[name] = teacher_state[f"{layer_prefix}{kept[int(index)]}.{rest}"]
            else:
                new_state[name] = teacher_state[name]
        student.load_state_dict({k: v.float() for k, v in new_state.items()})
    return student.to(ctx.device), kept


def raise_on_tokenizer_mismatch(teacher_tok, student_tok) -> None:
    if (reason := tokenizer_mismatch(teacher_tok, student_tok)) is not None:
        raise ValueError(f"student.model: {reason}; distillation matches next-token distributions, so both "
                         "must share one tokenizer")


def resolve_layer_map(loss: DistillLoss, kept: list[int] | None, student_layers: int, teacher_layers: int) -> dict:
    """student layer -> teacher layer for the hidden-state loss (empty when it is off)."""
    if loss.hidden_weight == 0:
        return {}
    if loss.layer_map is not None:
        layer_map = dict(loss.layer_map)
    elif kept is not None:
        layer_map = dict(enumerate(kept))
    else:
        raise ValueError("loss.layer_map is needed for the hidden-state loss with an existing student model")
    for s, t in layer_map.items():
        if not (0 <= s < student_layers and 0 <= t < teacher_layers):
            raise ValueError(f"loss.layer_map: {s} -> {t} is out of range (student has {student_layers} layers, "
                             f"teacher {teacher_layers})")
    return layer_map
