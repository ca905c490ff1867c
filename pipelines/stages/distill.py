"""The distill stage: train a smaller student to match a teacher, then hand the student on.

The teacher runs in inference mode (no grad, optionally lower precision). The student is an
existing model or derived from the teacher (a subset of its layers, weights copied; or narrower,
randomly initialised). Loss = kd_weight * KD + ce_weight * CE + hidden_weight * hidden-state loss.

Resume: the batch of every step is a pure function of (seed, step), and checkpoints hold the
student, the hidden-state projections, the optimizer and the scheduler (safetensors + JSON, no
pickles), written to `checkpoints/step-N.tmp` and renamed when complete; a re-run of the same
command continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import Distill, DistillLoss, StudentSpec
from llmopt.stages import StageContext

HISTORY = "history.jsonl"


def run(cfg: Distill, src: Artifact, out: Path, ctx: StageContext, base: Artifact | None = None) -> Artifact:
    """`base` is the teacher (the runner resolves it: the recipe's `teacher`, else the current model)."""
    import torch

    teacher_artifact = base or src
    tokenizer = load_tokenizer(teacher_artifact.path, ctx.trust_remote_code)
    teacher = load_model(teacher_artifact, ctx.device, cfg.teacher_dtype, ctx.trust_remote_code)
    teacher.requires_grad_(False)
    student, kept = build_student(cfg.student, teacher, tokenizer, ctx)
    layer_map = resolve_layer_map(cfg.loss, kept, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()

    (train_ids, train_mask), eval_blocks = make_blocks(cfg, tokenizer)
    batch = cfg.train.micro_batch_size
    steps = cfg.train.steps or cfg.train.epochs * math.ceil(len(train_ids) / (batch * cfg.train.grad_accum))
    widths_differ = student.config.hidden_size != teacher.config.hidden_size
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False)
        for s in (layer_map if widths_differ else {})
    }).to(ctx.device)
    params = [p for p in [*student.parameters(), *projections.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.train.schedule, optimizer, cfg.train.warmup_steps, steps)
    checkpoints = out / "checkpoints"
    start, history = load_latest_checkpoint(checkpoints, student, projections, optimizer, scheduler)
    autocast = torch.autocast(device_type=ctx.device, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    from llmopt.progress import progress_bar

    teacher_eval = evaluate_ppl(teacher, eval_blocks, cfg, ctx)
    tokens_done, started = 0, time.perf_counter()
    student.train()
    with progress_bar(steps - start, "distilling", enabled=ctx.progress) as advance:
        for step in range(start, steps):
            totals = {"kd": 0.0, "ce": 0.0, "hidden": 0.0, "total": 0.0}
            for micro in range(cfg.train.grad_accum):
                rows = step_rows(len(train_ids), cfg, step, micro)
                ids, mask = train_ids[rows].to(ctx.device), train_mask[rows].to(ctx.device)
                with torch.no_grad():
                    t_out = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layer_map))
                with autocast:
                    s_out = student(input_ids=ids, attention_mask=mask, output_hidden_states=bool(layer_map))
                parts = distill_loss(cfg.loss, s_out, t_out, ids, mask, layer_map, projections)
                (parts["total"] / cfg.train.grad_accum).backward()
                for name, value in parts.items():
                    totals[name] += value.item() / cfg.train.grad_accum
                tokens_done += ids.numel()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = {"step": step + 1, **{f"distill/loss_{k}": v for k, v in totals.items()},
                   "distill/lr": scheduler.get_last_lr()[0],
                   "distill/tokens_per_s": tokens_done / (time.perf_counter() - started)}
            if (step + 1) % cfg.train.eval_every == 0 or step + 1 == steps:
                row["distill/eval_ppl_student"] = evaluate_ppl(student, eval_blocks, cfg, ctx)
                row["distill/eval_ppl_teacher"] = teacher_eval
                student.train()
            history.append(row)
            if (step + 1) % cfg.train.save_every == 0 and step + 1 < steps:
                save_checkpoint(checkpoints, step + 1, student, projections, optimizer, scheduler, history)
            advance(loss=f"{totals['total']:.3f}")

    student.eval()
    student.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))
    shutil.rmtree(checkpoints, ignore_errors=True)  # the student is the artifact; checkpoints only served resume
    final = history[-1]
    metrics = {
        "distill/student_params": float(sum(p.numel() for p in student.parameters())),
        "distill/teacher_params": float(sum(p.numel() for p in teacher.parameters())),
        "distill/eval_ppl_student": final["distill/eval_ppl_student"],
        "distill/eval_ppl_teacher": teacher_eval,
        "distill/tokens_per_s": final["distill/tokens_per_s"],
        "distill/resumed_from_step": float(start),
    }
    return Artifact(out, "hf-checkpoint", metrics, {"format": "distilled", "kept_layers": kept})


# --- the student --------------------------------------------------------------------------------


def build_student(spec: StudentSpec, teacher, tokenizer, ctx: StageContext):
    """(student, kept teacher layers or None). A derived student copies the kept layers' weights,
    embeddings, final norm and head when its widths equal the teacher's; narrower is random init."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    if spec.model is not None:
        from llmopt.models import resolve_base

        _, artifact = resolve_base(spec.model, ctx.cache_root, progress=False)
        raise_on_tokenizer_mismatch(tokenizer, load_tokenizer(artifact.path, ctx.trust_remote_code))
        return load_model(artifact, ctx.device, "float32", ctx.trust_remote_code), None

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
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise ValueError("student.model: its tokenizer differs from the teacher's; distillation matches "
                         "next-token distributions, so both must share one vocabulary")


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


# --- losses -------------------------------------------------------------------------------------


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


def distill_loss(loss: DistillLoss, s_out, t_out, ids, mask, layer_map: dict, projections) -> dict:
    """The loss components on one batch; padding (mask 0) counts nowhere."""
    import torch
    import torch.nn.functional as F

    zero = torch.zeros((), device=ids.device)
    s_logits, t_logits = s_out.logits[:, :-1], t_out.logits[:, :-1]
    predicts_real_token = mask[:, 1:].bool()  # position p predicts token p + 1
    parts = {"kd": zero, "ce": zero, "hidden": zero}
    if loss.kd_weight:
        parts["kd"] = kd_loss(s_logits, t_logits, loss.kd, loss.temperature, loss.jsd_beta, predicts_real_token)
    if loss.ce_weight:
        labels = ids[:, 1:].masked_fill(~predicts_real_token, -100)
        parts["ce"] = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]).float(), labels.reshape(-1))
    if loss.hidden_weight and layer_map:
        terms = []
        for s, t in layer_map.items():
            hidden = s_out.hidden_states[s + 1]  # [0] is the embedding output
            if str(s) in projections:
                hidden = projections[str(s)](hidden)
            terms.append(hidden_loss(hidden, t_out.hidden_states[t + 1], loss.hidden_loss, mask.bool()))
        parts["hidden"] = torch.stack(terms).mean()
    parts["total"] = loss.kd_weight * parts["kd"] + loss.ce_weight * parts["ce"] + loss.hidden_weight * parts["hidden"]
    return parts


# --- data ---------------------------------------------------------------------------------------


def make_blocks(cfg: Distill, tokenizer):
    """((train ids, mask), (eval ids, mask)), blocks of `seq_len`: packed from the token stream (mask
    all ones), or one record per block, right-padded (mask 0 on the padding)."""
    import torch

    data = cfg.data

    def blocks(spec):
        texts = load_texts(spec, limit=data.max_samples)
        if data.packing:
            stream = token_stream(tokenizer, texts)
            n = len(stream) // data.seq_len
            ids = torch.tensor(stream[: n * data.seq_len]).view(n, data.seq_len)
            return ids, torch.ones_like(ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rows = [token_stream(tokenizer, [t])[: data.seq_len] for t in texts]
        ids = torch.tensor([r + [pad] * (data.seq_len - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (data.seq_len - len(r)) for r in rows])
        return ids, mask

    train_ids, train_mask = blocks(data.dataset)
    if data.eval_dataset is not None:
        held_out = blocks(data.eval_dataset)
    else:
        n_eval = max(1, int(len(train_ids) * data.eval_fraction))
        held_out = train_ids[-n_eval:], train_mask[-n_eval:]
        train_ids, train_mask = train_ids[:-n_eval], train_mask[:-n_eval]
    if len(train_ids) < cfg.train.micro_batch_size:
        raise ValueError(f"data: {len(train_ids)} training blocks of {data.seq_len} tokens, fewer than one "
                         f"micro-batch ({cfg.train.micro_batch_size})")
    return (train_ids, train_mask), held_out


def step_rows(n_blocks: int, cfg: Distill, step: int, micro: int):
    """Block indices of micro-batch (step, micro): a seeded permutation per epoch, so the batch is a
    function of (seed, step) and resume needs no RNG state."""
    import torch

    size = cfg.train.micro_batch_size
    position = (step * cfg.train.grad_accum + micro) * size
    epoch, offset = divmod(position, n_blocks // size * size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))
    return order[offset : offset + size]


def evaluate_ppl(model, blocks, cfg: Distill, ctx: StageContext) -> float:
    """Perplexity over the first `eval_batches` micro-batches of held-out blocks (padding excluded)."""
    import torch

    ids_all, mask_all = blocks
    size = cfg.train.micro_batch_size
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, min(len(ids_all), size * cfg.train.eval_batches), size):
            ids, mask = ids_all[i : i + size].to(ctx.device), mask_all[i : i + size].to(ctx.device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
            count += int(mask[:, 1:].sum())
    model.train(was_training)
    return math.exp(nll / count)


# --- checkpoints (safetensors + JSON; nothing pickled) ------------------------------------------


def save_checkpoint(root: Path, step: int, student, projections, optimizer, scheduler, history: list) -> None:
    from safetensors.torch import save_file

    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, tmp / "student.safetensors")
    save_file({k: v.contiguous() for k, v in projections.state_dict().items()}, tmp / "projections.safetensors")
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, slots in state["state"].items() for name, value in slots.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "optimizer.safetensors")
    meta = {"step": step, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(), "history": history}
    (tmp / "trainer_state.json").write_text(json.dumps(meta))  # last: its presence marks the checkpoint complete
    tmp.rename(final)
    for older in sorted(root.glob("step-????????"))[:-1]:  # keep the newest only
        shutil.rmtree(older)


def load_latest_checkpoint(root: Path, student, projections, optimizer, scheduler) -> tuple[int, list]:
    """(first step to run, history so far): 0 and [] when there is no complete checkpoint."""
    import torch
    from safetensors.torch import load_file

    found = sorted(p for p in root.glob("step-????????") if (p / "trainer_state.json").is_file())
    if not found:
        return 0, []
    latest = found[-1]
    meta = json.loads((latest / "trainer_state.json").read_text())
    device = next(student.parameters()).device
    student.load_state_dict(load_file(latest / "student.safetensors", device=str(device)))
    if len(projections):
        projections.load_state_dict(load_file(latest / "projections.safetensors", device=str(device)))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(latest / "optimizer.safetensors", device=str(device)).items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value.cpu() if name == "step" else value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"], meta["history"]
