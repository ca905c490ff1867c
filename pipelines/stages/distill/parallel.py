"""How distillation spreads over processes: the pipeline launches `torchrun`, each process trains
its shard of every global batch under DDP or FSDP (torch's own, FSDP2 `fully_shard`), and rank 0
alone writes checkpoints, the history and the student.

The global batch of a step is the same set of blocks whatever the number of processes
(`micro_batch_size` rows per process, rank r taking the r-th slice), and logged losses and
held-out perplexities are reduced over all ranks, so an N-process run follows the single-process
trajectory for `micro_batch_size * N` rows, up to floating-point reduction order.

The launcher: the parent (the pipeline) writes `launch.json` into the stage's output folder and
runs `python -m torch.distributed.run --standalone --nproc-per-node N -m llmopt.stages.distill.parallel
<out>`; worker output goes to `workers.log` there; a failing rank writes `error-rank<R>.txt`,
which becomes the stage's error. Workers die with the pipeline (PR_SET_PDEATHSIG), so a killed
run leaves no process writing into the folder the next run resumes from.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from llmopt.cache import Artifact
from llmopt.isolated import die_with_parent
from llmopt.machine import usable_cpus
from llmopt.recipe import Distill
from llmopt.stages import StageContext

LAUNCH = "launch.json"
RESULT = "result.json"
WORKERS_LOG = "workers.log"


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group; the default is the single, undistributed process."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where reductions run: the rank's own GPU under NCCL

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """Each value summed over all ranks."""
        if self.world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value: float) -> list[float]:
        """Every rank's value, in rank order."""
        slots = [0.0] * self.world
        slots[self.rank] = value
        return self.sum(*slots)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def wrap(self, trainee: Trainee, strategy: str) -> torch.nn.Module:
        """The module to run forward/backward through: `trainee` itself in one process; DDP keeps a
        full replica per rank; FSDP shards each decoder layer and the rest (embeddings, head,
        projections) as the root group, in place, so `trainee.parameters()` are the shards."""
        if self.world == 1:
            return trainee
        if strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(trainee, device_ids=[self.device] if self.device != "cpu" else None)
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(trainee.student, "_no_split_modules", None) or [])
        layers = [m for m in trainee.student.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ValueError(f"FSDP: {type(trainee.student).__name__} names no decoder layer class to shard by "
                             "(_no_split_modules); use strategy: ddp")
        for layer in layers:
            fully_shard(layer)
        fully_shard(trainee)
        return trainee

    @contextlib.contextmanager
    def accumulating(self, model: torch.nn.Module, sync: bool):
        """Skip the gradient all-reduce on micro-batches before the last of a step."""
        if self.world == 1 or sync:
            yield
        elif hasattr(model, "no_sync"):  # DDP
            with model.no_sync():
                yield
        else:  # FSDP2
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)


class Trainee(torch.nn.Module):
    """The trained parameters as one module: the student and, when its width differs from the
    teacher's, one projection per mapped layer. Forward gives the logits and the (projected)
    hidden states of the mapped student layers."""

    def __init__(self, student: torch.nn.Module, projections: torch.nn.ModuleDict, layer_map: dict[int, int]):
        super().__init__()
        self.student = student
        self.projections = projections
        self.layer_map = layer_map

    def forward(self, input_ids, attention_mask):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(self.layer_map))
        hidden = {}
        for s in self.layer_map:
            h = out.hidden_states[s + 1]  # [0] is the embedding output
            hidden[s] = self.projections[str(s)](h) if str(s) in self.projections else h
        return out.logits, hidden


# --- the parent side ----------------------------------------------------------------------------


def launch(cfg: Distill, teacher: Artifact, student: Artifact | None, topk: Path | None, out: Path,
           ctx: StageContext) -> Artifact:
    """Run the distillation in `cfg.distributed.num_processes` processes and return rank 0's result."""
    n = cfg.distributed.num_processes
    spec = {
        "cfg": cfg.model_dump_json(),
        "teacher": {"path": str(teacher.path), "kind": teacher.kind, "info": teacher.info},
        "student": None if student is None else {"path": str(student.path), "kind": student.kind, "info": student.info},
        "topk": str(topk) if topk else None,
        "ctx": {"device": ctx.device, "dtype": ctx.dtype, "trust_remote_code": ctx.trust_remote_code,
                "progress": ctx.progress, "cache_root": str(ctx.cache_root) if ctx.cache_root else None},
    }
    for stale in [out / RESULT, *out.glob("error-rank*.txt")]:
        stale.unlink(missing_ok=True)
    (out / LAUNCH).write_text(json.dumps(spec, indent=1))
    env = dict(os.environ)
    if ctx.device == "cpu":  # n processes share the cores; oversubscribed OpenMP threads slow everything down
        env["OMP_NUM_THREADS"] = str(max(1, usable_cpus() // n))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "llmopt.stages.distill.parallel", str(out)]
    with open(out / WORKERS_LOG, "a") as log:
        returncode = subprocess.run(command, stderr=log, env=env,
                                    preexec_fn=lambda: die_with_parent(signal.SIGTERM)).returncode
    if returncode != 0:
        errors = sorted(out.glob("error-rank*.txt"))
        reason = errors[0].read_text().strip() if errors else f"see {out / WORKERS_LOG}"
        raise RuntimeError(f"{n}-process {cfg.distributed.strategy} run failed (torchrun exit {returncode}): {reason}")
    result = json.loads((out / RESULT).read_text())
    (out / RESULT).unlink()
    (out / LAUNCH).unlink()
    return Artifact(out, "hf-checkpoint", result["metrics"], result["info"])


# --- the worker side ----------------------------------------------------------------------------


def main(out: Path) -> None:
    die_with_parent(signal.SIGKILL)
    from llmopt.stages.distill.train import train

    spec = json.loads((out / LAUNCH).read_text())
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    ctx = StageContext(**{**spec["ctx"], "cache_root": Path(spec["ctx"]["cache_root"]) if spec["ctx"]["cache_root"] else None})
    if ctx.device == "cuda":
        torch.cuda.set_device(local_rank)
        ctx = replace(ctx, device=f"cuda:{local_rank}")
        dist.init_process_group("nccl", device_id=torch.device(ctx.device))
    else:
        dist.init_process_group("gloo")
    ranks = Ranks(rank, world, ctx.device)
    ctx = replace(ctx, progress=ctx.progress and ranks.main)
    try:
        # the parent validated the recipe strictly; its JSON dump needs lax types back (str -> Path, "0" -> 0)
        cfg = Distill.model_validate(json.loads(spec["cfg"]), strict=False)
        teacher = Artifact(Path(spec["teacher"]["path"]), spec["teacher"]["kind"], info=spec["teacher"]["info"])
        student = spec["student"] and Artifact(Path(spec["student"]["path"]), spec["student"]["kind"],
                                               info=spec["student"]["info"])
        topk = Path(spec["topk"]) if spec["topk"] else None
        artifact = train(cfg, teacher, student, topk, out, ctx, ranks)
        if ranks.main:
            (out / RESULT).write_text(json.dumps({"metrics": artifact.metrics, "info": artifact.info}))
    except Exception as e:
        (out / f"error-rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\n")
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
