"""The evaluate stage: quality of one model. The runner calls it for the candidate and the base."""

from __future__ import annotations

import json
from pathlib import Path

from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.eval.perplexity import perplexity
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import Evaluate
from llmopt.stages import StageContext


def run(cfg: Evaluate, src: Artifact, out: Path, ctx: StageContext, base: Artifact | None = None) -> Artifact:
    """Perplexity of `src`; given the `base` model, also the KL divergence of `src` from it."""
    spec = cfg.perplexity
    tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
    model = load_model(src, ctx.device, ctx.dtype, ctx.trust_remote_code)
    reference = load_model(base, ctx.device, ctx.dtype, ctx.trust_remote_code) if base is not None else None
    ids = token_stream(tokenizer, load_texts(spec.dataset, limit=spec.max_samples))
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and spec.seq_len > max_positions:
        raise ValueError(f"perplexity.seq_len {spec.seq_len} exceeds the model's context of {max_positions} tokens")
    result = perplexity(model, ids, spec.seq_len, spec.stride or spec.seq_len, spec.batch_size, ctx.progress, reference)
    (out / "report.json").write_text(json.dumps({"perplexity": result, "model": str(src.path)}, indent=2))
    metrics = {"quality/ppl": result["ppl"], "quality/nll": result["nll"], "quality/eval_tokens": result["tokens"]}
    if "kl" in result:
        metrics["quality/kl_base"] = result["kl"]
    return Artifact(out, "report", metrics)


def paired_metrics(candidate: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    """Candidate metrics beside the base model's, under the same settings, and the relative change."""
    return {
        **candidate,
        "quality/ppl_base": base["quality/ppl"],
        "quality/ppl_delta_pct": 100.0 * (candidate["quality/ppl"] / base["quality/ppl"] - 1.0),
    }
