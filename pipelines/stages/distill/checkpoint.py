"""Checkpoints (safetensors + JSON; nothing pickled) and the saved student.

Model and optimizer state are saved whole (FSDP shards gathered, keyed by parameter name), so a
checkpoint is the same files whatever wrote it, and every rank loads its part from them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from llmopt.cache import atomic_dir


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
        with atomic_dir(root / f"step-{step:08d}") as tmp:  # renamed to step-N only when complete
            save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
            slots = {f"{name}::{slot}": value for name, state in optimizer_state["state"].items()
                     for slot, value in state.items()}
            tensors = {k: v.contiguous() for k, v in slots.items() if isinstance(v, torch.Tensor)}
            save_file(tensors, tmp / "optimizer.safetensors")
            meta = {"step": step, "param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict(),
                    "optimizer_scalars": {k: v for k, v in slots.items() if k not in tensors},  # e.g. Adafactor's int step
                    "history": history}
            (tmp / "trainer_state.json").write_text(json.dumps(meta))
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


def drop_checkpoints(root: Path) -> None:
    """The student is the artifact; checkpoints only served resume."""
    shutil.rmtree(root, ignore_errors=True)


def save_student(student, state: dict | None, out: Path) -> None:
    """Write the student as an HF checkpoint; under several processes from its full `state`
    (gathered from the shards under FSDP) through a plain copy of the module."""
    if state is not None:
        from transformers import AutoModelForCausalLM

        weights = {name.removeprefix("student."): t for name, t in state.items() if name.startswith("student.")}
        plain = AutoModelForCausalLM.from_config(student.config, dtype=next(iter(weights.values())).dtype)
        plain.load_state_dict(weights)
        student = plain
    student.save_pretrained(out, safe_serialization=True)
