"""The distill stage: train a smaller student to match a teacher, then hand the student on.

The teacher runs in inference mode (no grad, optionally lower precision). The student is an
existing model or derived from the teacher (a subset of its layers, weights copied; or narrower,
randomly initialised). Loss = kd_weight * KD + ce_weight * CE + hidden_weight * hidden-state loss.

Resume: the batch of every step is a pure function of (seed, step), and checkpoints hold the
student, the hidden-state projections, the optimizer and the scheduler (safetensors + JSON, no
pickles), written to `checkpoints/step-N.tmp` and renamed when complete; a re-run of the same
command continues from the newest complete checkpoint.

`run` (train) is the stage; with `distributed.num_processes > 1` it launches the training loop in
worker processes (parallel), otherwise it runs the loop itself. The parts: losses, student (derive
it from the teacher), data (blocks and the rows of each step), topk (the teacher's precomputed
top-k logits), checkpoint (resume checkpoints and the saved student).

Only parallel imports torch at its top, and only the training loop and the workers import it:
importing the stage loads no torch, and `python -m llmopt.stages.distill.parallel` runs a module
its package has not imported yet.
"""

from llmopt.stages import HISTORY
from llmopt.stages.distill.data import make_blocks, step_rows
from llmopt.stages.distill.losses import TeacherOutput, distill_loss, hidden_loss, kd_loss, kd_loss_topk
from llmopt.stages.distill.student import build_student, resolve_layer_map
from llmopt.stages.distill.topk import TOPK_DIR, TOPK_FILE, precompute_teacher_topk
from llmopt.stages.distill.train import run

__all__ = ["HISTORY", "TOPK_DIR", "TOPK_FILE", "TeacherOutput", "build_student", "distill_loss", "hidden_loss",
           "kd_loss", "kd_loss_topk", "make_blocks", "precompute_teacher_topk", "resolve_layer_map", "run",
           "step_rows"]
