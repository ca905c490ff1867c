"""The teacher's precomputed top-k logits: computed once per teacher, data and k, and kept under the
cache root for every later run to train on without the teacher in memory."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmopt.cache import Artifact
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import Distill
from llmopt.stages import StageContext
from llmopt.stages.distill.data import make_blocks

TOPK_DIR = "teacher-topk"  # Cache.folder kind: <cache root>/teacher-topk/<key>/topk.safetensors
TOPK_FILE = "topk.safetensors"


def precompute_teacher_topk(cfg: Distill, teacher_artifact: Artifact, ctx: StageContext) -> Path:
    """The teacher's top-k logits (float32) and their vocabulary indices (int32) for every position
    of every training block, `[blocks, seq_len, k]`, in one safetensors file under the cache root,
    keyed by the teacher's content, the data and k: computed once, reused by every later run (other
    students, losses, learning rates). Size: blocks * seq_len * k * 8 bytes."""
    from llmopt.cache import Cache, content_key, directory_digest, key_config, stage_code
    from llmopt.versions import library_versions

    root = ctx.cache_dir()
    identity = {"teacher": directory_digest(teacher_artifact.path, root / "digests.json"),
                "teacher_dtype": cfg.teacher_dtype, "data": key_config(cfg.data.model_dump(mode="json")),
                "k": cfg.teacher_topk, "device": (cfg.teacher_device or ctx.device).split(":")[0],
                "libraries": library_versions(("torch", "transformers")), "code": stage_code(__name__)}
    return Cache(root).folder(TOPK_DIR, content_key(identity), lambda tmp: _compute(cfg, teacher_artifact, ctx, identity,
                                                                                  tmp / TOPK_FILE)) / TOPK_FILE


def _compute(cfg: Distill, teacher_artifact: Artifact, ctx: StageContext, identity: dict, path: Path) -> None:
    import torch
    from llmopt.progress import progress_bar
    from safetensors.torch import save_file

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
    save_file({"values": values, "indices": indices}, path, metadata={"identity": json.dumps(identity)})
