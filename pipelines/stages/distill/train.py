"""The training loop of one process, and `run`, the stage: it resolves the student model and the
teacher's top-k logits once, then trains here or in worker processes (parallel)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from llmopt.cache import Artifact
from llmopt.eval.perplexity import next_token_logprobs, scored_nll
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import Distill, DistillTrain
from llmopt.stages import HISTORY, StageContext
from llmopt.stages.distill import checkpoint  # through the module, so that a test can patch drop_checkpoints
from llmopt.stages.distill.data import make_blocks, step_rows
from llmopt.stages.distill.losses import TeacherOutput, distill_loss
from llmopt.stages.distill.student import build_student, resolve_layer_map
from llmopt.stages.distill.topk import precompute_teacher_topk


def run(cfg: Distill, src: Artifact, out: Path, ctx: StageContext, base: Artifact | None = None) -> Artifact:
    """`base` is the teacher (the runner resolves it: the recipe's `teacher`, else the current model)."""
    from llmopt.stages.distill import parallel

    teacher = base or src
    student = None
    if cfg.student.model is not None:  # resolved (downloaded, built) once here, not by every rank
        from llmopt.models import resolve_base

        _, student = resolve_base(cfg.student.model, ctx.cache_dir(), progress=ctx.progress)
    topk = precompute_teacher_topk(cfg, teacher, ctx) if cfg.teacher_topk else None  # once, before any rank starts
    if cfg.distributed.num_processes > 1:
        return parallel.launch(cfg, teacher, student, topk, out, ctx)
    return train(cfg, teacher, student, topk, out, ctx, parallel.Ranks())


def train(cfg: Distill, teacher_artifact: Artifact, student_artifact: Artifact | None, topk: Path | None, out: Path,
          ctx: StageContext, ranks) -> Artifact:
    """The training loop of one process (`ranks`: its place in the group, see parallel).
    `topk`: the teacher's precomputed top-k logits; the teacher then leaves memory once it has
    initialised the student and been evaluated."""
    import torch
    from llmopt.stages.distill.parallel import Trainee

    tokenizer = load_tokenizer(teacher_artifact.path, ctx.trust_remote_code)
    teacher_device = cfg.teacher_device or ctx.device  # a device of its own: outputs come back to the student's
    teacher = load_model(teacher_artifact, teacher_device, cfg.teacher_dtype, ctx.trust_remote_code)
    teacher.requires_grad_(False)
    student, kept = build_student(cfg.student, teacher, tokenizer, ctx, student_artifact)
    layer_map = resolve_layer_map(cfg.loss, kept, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    (train_ids, train_mask), eval_blocks = make_blocks(cfg, tokenizer)
    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum * ranks.world
    steps = cfg.train.steps or cfg.train.epochs * math.ceil(len(train_ids) / global_batch)
    widths_differ = student.config.hidden_size != teacher.config.hidden_size
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size, bias=False)
        for s in (layer_map if widths_differ else {})
    }).to(ctx.device)
    student_params = sum(p.numel() for p in student.parameters())
    trainee = Trainee(student, projections, layer_map)
    model = ranks.wrap(trainee, cfg.distributed.strategy)
    params = [p for p in trainee.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.train, params)
    from transformers import get_scheduler

    scheduler = get_scheduler(cfg.train.schedule, optimizer, cfg.train.warmup_steps, steps)
    checkpoints = out / "checkpoints"
    start, history = checkpoint.load_latest_checkpoint(checkpoints, trainee, optimizer, scheduler)
    device_type = ctx.device.split(":")[0]
    autocast = torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")

    def teacher_logits(ids, mask):
        return teacher(input_ids=ids.to(teacher_device), attention_mask=mask.to(teacher_device)).logits.to(ctx.device)

    def student_logits(ids, mask):
        with autocast:
            return model(ids, mask)[0]

    from llmopt.progress import progress_bar

    teacher_eval = evaluate_ppl(teacher_logits, eval_blocks, cfg, ctx, ranks)
    teacher_params = sum(p.numel() for p in teacher.parameters())
    if topk is not None:
        from safetensors import safe_open

        del teacher
        if teacher_device.startswith("cuda"):
            torch.cuda.empty_cache()
        stored = safe_open(topk, framework="pt")
        topk_values, topk_indices = stored.get_slice("values"), stored.get_slice("indices")

        def teacher_outputs(rows, ids, mask):
            take = lambda part: torch.cat([part[int(r) : int(r) + 1] for r in rows]).to(ctx.device)  # noqa: E731
            return TeacherOutput(topk=(take(topk_values), take(topk_indices)))
    else:
        def teacher_outputs(rows, ids, mask):
            with torch.no_grad():
                out = teacher(input_ids=ids.to(teacher_device), attention_mask=mask.to(teacher_device),
                              output_hidden_states=bool(layer_map))
            hidden = tuple(h.to(ctx.device) for h in out.hidden_states) if layer_map else None
            return TeacherOutput(logits=out.logits.to(ctx.device), hidden_states=hidden)
    tokens_done, started = 0, time.perf_counter()
    model.train()
    with progress_bar(steps - start, "distilling", enabled=ctx.progress) as advance:
        for step in range(start, steps):
            totals = dict.fromkeys(("kd", "ce", "hidden", "total"), 0.0)
            for micro in range(cfg.train.grad_accum):
                rows = step_rows(len(train_ids), cfg, step, micro, ranks.rank, ranks.world)
                ids, mask = train_ids[rows].to(ctx.device), train_mask[rows].to(ctx.device)
                with ranks.accumulating(model, sync=micro == cfg.train.grad_accum - 1):
                    t_out = teacher_outputs(rows, ids, mask)
                    with autocast:
                        s_logits, s_hidden = model(ids, mask)
                    parts = distill_loss(cfg.loss, s_logits, s_hidden, t_out, ids, mask, layer_map)
                    (parts["total"] / cfg.train.grad_accum).backward()
                for name, value in parts.items():
                    totals[name] += value.item() / cfg.train.grad_accum
                tokens_done += ids.numel() * ranks.world
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals = dict(zip(totals, (v / ranks.world for v in ranks.sum(*totals.values())), strict=True))
            row = {"step": step + 1, **{f"distill/loss_{k}": v for k, v in totals.items()},
                   "distill/lr": scheduler.get_last_lr()[0],
                   "distill/tokens_per_s": tokens_done / (time.perf_counter() - started)}
            if (step + 1) % cfg.train.eval_every == 0 or step + 1 == steps:
                row["distill/eval_ppl_student"] = evaluate_ppl(student_logits, eval_blocks, cfg, ctx, ranks, model)
                row["distill/eval_ppl_teacher"] = teacher_eval
            history.append(row)
            if (step + 1) % cfg.train.save_every == 0 and step + 1 < steps:
                checkpoint.save_checkpoint(checkpoints, step + 1, trainee, optimizer, scheduler, history, ranks)
            advance(loss=f"{totals['total']:.3f}")

    model.eval()
    student_state = checkpoint.full_state(trainee) if ranks.world > 1 else None  # collective: rank 0 gets the tensors
    peaks = ranks.gather(torch.cuda.max_memory_allocated() / 1e9 if device_type == "cuda" else 0.0)
    if ranks.main:
        checkpoint.save_student(student, student_state, out)
        tokenizer.save_pretrained(out)
        (out / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))
        checkpoint.drop_checkpoints(checkpoints)
    ranks.barrier()
    final = history[-1]
    metrics = {
        "distill/student_params": float(student_params),
        "distill/teacher_params": float(teacher_params),
        "distill/eval_ppl_student": final["distill/eval_ppl_student"],
        "distill/eval_ppl_teacher": teacher_eval,
        "distill/tokens_per_s": final["distill/tokens_per_s"],
        "distill/resumed_from_step": float(start),
    }
    if device_type == "cuda" and ranks.world > 1:
        metrics["memory/peak_gpu_gb"] = max(peaks)
        metrics.update({f"memory/peak_gpu_gb/rank{r}": peak for r, peak in enumerate(peaks)})
    return Artifact(out, "hf-checkpoint", metrics, {"format": "distilled", "kept_layers": kept})


def make_optimizer(train: DistillTrain, params: list):
    """AdamW; Adafactor (transformers', with the recipe's fixed learning rate and schedule rather
    than its relative steps); or SGD with momentum 0.9."""
    import torch

    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=train.learning_rate, weight_decay=train.weight_decay, relative_step=False,
                         scale_parameter=False, warmup_init=False)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.learning_rate, momentum=0.9, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.learning_rate, weight_decay=train.weight_decay)


def evaluate_ppl(logits_of, blocks, cfg: Distill, ctx: StageContext, ranks=None, module=None) -> float:
    """Perplexity over the first `eval_batches` global micro-batches of held-out blocks (padding excluded),
    `logits_of(ids, mask)` giving the model's logits. The batches are dealt out over the ranks and
    the sums reduced; every rank runs the same number of forward passes (FSDP's gathers are
    collective), a rank without a batch of its own recomputing the first and counting nothing."""
    import torch

    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    ids_all, mask_all = blocks
    size = cfg.train.micro_batch_size
    starts = list(range(0, min(len(ids_all), size * world * cfg.train.eval_batches), size))  # global micro-batches
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for index in range(rank, math.ceil(len(starts) / world) * world, world):
            i = starts[index] if index < len(starts) else 0
            ids, mask = ids_all[i : i + size].to(ctx.device), mask_all[i : i + size].to(ctx.device)
            logits = logits_of(ids, mask)
            if index >= len(starts):
                continue
            batch_nll, batch_count = scored_nll(next_token_logprobs(logits), ids, mask)
            nll += batch_nll
            count += batch_count
    if module is not None:
        module.train(was_training)
    if ranks is not None:
        nll, count = ranks.sum(nll, count)
    return math.exp(nll / count)
