"""The distill stage: train a smaller student to match a teacher, then hand the student on.

The teacher runs in inference mode (no grad, optionally lower precision). The student is an
existing model or derived from the teacher (a subset of its layers, weights copied; or narrower,
randomly initialised). Loss = kd_weight * KD + ce_weight * CE + hidden_weight * hidden-state loss.

Resume: the batch of every step is a pure function of (seed, step), and checkpoints hold the
student, the hidden-state projections, the optimizer and the scheduler (safetensors + JSON, no
pickles), written to `checkpoints/step-N.tmp` and renamed when complete; a re-run of the same
command continues from the newest complete checkpoint.

`run` is the stage; with `distributed.num_processes > 1` it launches `train` in worker processes
(see distill_parallel), otherwise it calls `train` itself.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.models import load_model, load_tokenizer, tokenizer_mismatch
from llmopt.recipe import Distill, DistillLoss, DistillTrain, StudentSpec
from llmopt.stages import StageContext

HISTORY = "history.jsonl"


def run(cfg: Distill, src: Artifact, out: Path, ctx: StageContext, base: Artifact | None = None) -> Artifact:
    """`base` is the teacher (the runner resolves it: the recipe's `teacher`, else the current model)."""
    from llmopt.stages import distill_parallel

    teacher = base or src
    student = None
    if cfg.student.model is not None:  # resolved (downloaded, built) once here, not by every rank
        from llmopt.models import resolve_base

        _, student = resolve_base(cfg.student.model, ctx.cache_dir(), progress=ctx.progress)
    topk = precompute_teacher_topk(cfg, teacher, ctx) if cfg.teacher_topk else None  # once, before any rank starts
    if cfg.distributed.num_processes > 1:
        return distill_parallel.launch(cfg, teacher, student, topk, out, ctx)
    return train(cfg, teacher, student, topk, out, ctx, distill_parallel.Ranks())


def train(cfg: Distill, teacher_artifact: Artifact, student_artifact: Artifact | None, topk: Path | None, out: Path,
          ctx: StageContext, ranks) -> Artifact:
    """The training loop of one process (`ranks`: its place in the group, see distill_parallel).
    `topk`: the teacher's precomputed top-k logits; the teacher then leaves memory once it has
    initialised the student and been evaluated."""
    import torch
    from llmopt.stages.distill_parallel import Trainee

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
    start, history = load_latest_checkpoint(checkpoints, trainee, optimizer, scheduler)
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
                save_checkpoint(checkpoints, step + 1, trainee, optimizer, scheduler, history, ranks)
            advance(loss=f"{totals['total']:.3f}")

    model.eval()
    student_state = full_state(trainee) if ranks.world > 1 else None  # collective: rank 0 gets the tensors
    peaks = ranks.gather(torch.cuda.max_memory_allocated() / 1e9 if device_type == "cuda" else 0.0)
    if ranks.main:
        _save_student(student, student_state, out)
        tokenizer.save_pretrained(out)
        (out / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))
        drop_checkpoints(checkpoints)
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


def drop_checkpoints(root: Path) -> None:
    """The student is the artifact; checkpoints only served resume."""
    shutil.rmtree(root, ignore_errors=True)


def _save_student(student, state: dict | None, out: Path) -> None:
    """Write the student as an HF checkpoint; under several processes from its full `state`
    (gathered from the shards under FSDP) through a plain copy of the module."""
    if state is not None:
        from transformers import AutoModelForCausalLM

        weights = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
        plain = AutoModelForCausalLM.from_config(student.config, dtype=next(iter(weights.values())).dtype)
        plain.load_state_dict(weights)
        student = plain
    student.save_pretrained(out, safe_serialization=True)


# --- the student --------------------------------------------------------------------------------


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


def step_rows(n_blocks: int, cfg: Distill, step: int, micro: int, rank: int = 0, world: int = 1):
    """Block indices of rank `rank`'s share of micro-batch (step, micro). The global micro-batch
    (`micro_batch_size` rows per rank) is a slice of a seeded permutation per epoch, so it is a
    function of (seed, step) alone: resume needs no RNG state, and N processes train on the
    same rows as one process with an N times larger micro-batch."""
    import torch

    size = cfg.train.micro_batch_size * world
    position = (step * cfg.train.grad_accum + micro) * size
    epoch, offset = divmod(position, n_blocks // size * size)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(cfg.train.seed * 100_003 + epoch))
    share = cfg.train.micro_batch_size
    return order[offset + rank * share : offset + (rank + 1) * share]


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
            logits = logits_of(ids, mask)[:, :-1].float()
            if index >= len(starts):
                continue
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum").item()
            count += int(mask[:, 1:].sum())
    if module is not None:
        module.train(was_training)
    if ranks is not None:
        nll, count = ranks.sum(nll, count)
    return math.exp(nll / count)


# --- precomputed teacher logits ------------------------------------------------------------------

TOPK_DIR = "teacher-topk"


def precompute_teacher_topk(cfg: Distill, teacher_artifact: Artifact, ctx: StageContext) -> Path:
    """The teacher's top-k logits (float32) and their vocabulary indices (int32) for every position
    of every training block, `[blocks, seq_len, k]`, in one safetensors file under the cache root,
    keyed by the teacher's content, the data and k: computed once, reused by every later run (other
    students, losses, learning rates). Size: blocks * seq_len * k * 8 bytes."""
    import hashlib
    import os

    import torch
    from llmopt.cache import directory_digest, key_config
    from llmopt.progress import progress_bar
    from llmopt.tracking import library_versions
    from safetensors.torch import save_file

    root = ctx.cache_dir()
    identity = {"teacher": directory_digest(teacher_artifact.path, root / "digests.json"),
                "teacher_dtype": cfg.teacher_dtype, "data": key_config(cfg.data.model_dump(mode="json")),
                "k": cfg.teacher_topk, "device": (cfg.teacher_device or ctx.device).split(":")[0],
                "libraries": library_versions(("torch", "transformers"))}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    path = root / TOPK_DIR / f"{key}.safetensors"
    if path.is_file():
        return path
    tokenizer = load_tokenizer(teacher_artifact.path, ctx.trust_remote_code)
    device = cfg.teacher_device or ctx.device
    teacher = load_model(teacher_artifact, device, cfg.teacher_dtype, ctx.trust_remote_code)
    k = cfg.teacher_topk
    if k > teacher.config.vocab_size:
        raise ValueError(f"teacher_topk: {k} is more than the teacher's vocabulary ({teacher.config.vocab_size} tokens)")
    (ids_all, mask_all), _ = make_blocks(cfg, tokenizer)
    values = torch.empty(*ids_all.shape, k, dtype=torch.float32)
    indices = torch.empty(*ids_all.shape, k, dtype=torch.int32)
    size = cfg.train.micro_batch_size
    with torch.no_grad(), progress_bar(math.ceil(len(ids_all) / size), "teacher top-k", enabled=ctx.progress) as advance:
        for i in range(0, len(ids_all), size):
            ids, mask = ids_all[i : i + size].to(device), mask_all[i : i + size].to(device)
            top = teacher(input_ids=ids, attention_mask=mask).logits.float().topk(k, dim=-1)
            values[i : i + size], indices[i : i + size] = top.values.cpu(), top.indices.int().cpu()
            advance()
    del teacher
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({"values": values, "indices": indices}, tmp, metadata={"identity": json.dumps(identity)})
    os.replace(tmp, path)
    return path


# --- checkpoints (safetensors + JSON; nothing pickled) ------------------------------------------
#
# Model and optimizer state are saved whole (FSDP shards gathered, keyed by parameter name), so a
# checkpoint is the same files whatever wrote it, and every rank loads its part from them.


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(trainee) -> dict:
    """The trainee's whole state dict on CPU; a collective under several processes (rank 0 gets it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(trainee, options=_full_options(cpu_offload=True))


def save_checkpoint(root: Path, step: int, trainee, optimizer, scheduler, history: list, ranks) -> None:
    import torch
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = full_state(trainee)
    optimizer_state = get_optimizer_state_dict(trainee, optimizer, options=_full_options(cpu_offload=True))
    if ranks.main:
        final = root / f"step-{step:08d}"
        tmp = root / f"step-{step:08d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        slots = {f"{name}::{slot}": value for name, state in optimizer_state["state"].items()
                 for slot, value in state.items()}
        tensors = {k: v.contiguous() for k, v in slots.items() if isinstance(v, torch.Tensor)}
        save_file(tensors, tmp / "optimizer.safetensors")
        meta = {"step": step, "param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict(),
                "optimizer_scalars": {k: v for k, v in slots.items() if k not in tensors},  # e.g. Adafactor's int step
                "history": history}
        (tmp / "trainer_state.json").write_text(json.dumps(meta))  # last: its presence marks the checkpoint complete
        tmp.rename(final)
        for older in sorted(root.glob("step-????????"))[:-1]:  # keep the newest only
            shutil.rmtree(older)
    ranks.barrier()


def load_latest_checkpoint(root: Path, trainee, optimizer, scheduler) -> tuple[int, list]:
    """(first step to run, history so far): 0 and [] when there is no complete checkpoint. Every
    rank reads the files and keeps its part."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    found = sorted(p for p in root.glob("step-????????") if (p / "trainer_state.json").is_file())
    if not found:
        return 0, []
    latest = found[-1]
    meta = json.loads((latest / "trainer_state.json").read_text())
    set_model_state_dict(trainee, load_file(latest / "model.safetensors"), options=_full_options())
    state: dict[str, dict] = {}
    for key, value in [*load_file(latest / "optimizer.safetensors").items(), *meta["optimizer_scalars"].items()]:
        name, slot = key.rsplit("::", 1)
        state.setdefault(name, {})[slot] = value
    set_optimizer_state_dict(trainee, optimizer, {"state": state, "param_groups": meta["param_groups"]},
                             options=_full_options())
    scheduler.load_state_dict(meta["scheduler"])
    return meta["step"], meta["history"]
