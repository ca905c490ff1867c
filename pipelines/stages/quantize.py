"""The quantize stage: runs the recipe's method (llmopt.methods.<method>) and adds what every
method reports, the stored size against the base.

Each method writes an HF checkpoint directory (safetensors + config + tokenizer); `Artifact.info`
says how `load_model` gets the model back (its `format`, which names the method that loads it),
and `serving_format` which row of the serving table (llmopt.export.support) it is.
"""

from __future__ import annotations

from pathlib import Path

from llmopt import methods
from llmopt.cache import Artifact
from llmopt.models import weights_bytes
from llmopt.stages import StageContext


def run(cfg, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
    method = methods.get(cfg.method)
    artifact = method.quantize(cfg, src, out, ctx)
    stored = weights_bytes(out)
    base = weights_bytes(src.path)
    metrics = {
        "memory/weights_gb": stored / 1e9,
        "memory/weights_gb_base": base / 1e9,
        "memory/compression_ratio": base / stored,
        **artifact.metrics,
    }
    undeclared = set(artifact.metrics) - set(method.metrics)
    if undeclared:  # the gates' metric catalogue is built from the declarations: keep them true
        raise RuntimeError(f"method {method.name} logged {sorted(undeclared)} without declaring them in `metrics`")
    return Artifact(out, "hf-checkpoint", metrics, {**artifact.info, "serving_format": method.serving_format(cfg),
                                                    "kernel_spec": method.kernel_spec(cfg)})
