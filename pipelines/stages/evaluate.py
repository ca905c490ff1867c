"""The evaluate stage: quality of one model. The runner calls it for the candidate and the base
(cached, so the base is evaluated once per setting) and pairs the two with `paired`."""

from __future__ import annotations

import json
import time
from pathlib import Path

from llmopt import kernels
from llmopt.cache import Artifact
from llmopt.data import load_texts, token_stream
from llmopt.eval.perplexity import perplexity
from llmopt.models import load_model, load_tokenizer
from llmopt.recipe import Evaluate, Gates
from llmopt.stages import Paired, StageContext


def run(cfg: Evaluate, src: Artifact, out: Path, ctx: StageContext, base: Artifact | None = None) -> Artifact:
    """Perplexity of `src` (given the `base` model, also the KL divergence of `src` from it) and
    the lm-eval tasks."""
    tokenizer = load_tokenizer(src.path, ctx.trust_remote_code)
    model, applied = kernels.load_accelerated(src, ctx.device, ctx.dtype, ctx.trust_remote_code, cfg.kernel, ctx.cache_dir())
    metrics: dict[str, float] = {}  # the kernel's costs are the benchmark's to report; the tag says which ran
    info: dict = {}
    report: dict = {"model": str(src.path), "kernel": applied.tag()}
    if (spec := cfg.perplexity) is not None:
        reference = load_model(base, ctx.device, ctx.dtype, ctx.trust_remote_code) if base is not None else None
        ids = token_stream(tokenizer, load_texts(spec.dataset, limit=spec.max_samples))
        max_positions = getattr(model.config, "max_position_embeddings", None)
        if max_positions is not None and spec.seq_len > max_positions:
            raise ValueError(f"perplexity.seq_len {spec.seq_len} exceeds the model's context of {max_positions} tokens")
        result = perplexity(model, ids, spec.seq_len, spec.stride or spec.seq_len, spec.batch_size, ctx.progress,
                            reference)
        del reference
        report["perplexity"] = result
        metrics.update({"quality/ppl": result["ppl"], "quality/nll": result["nll"], "quality/eval_tokens": result["tokens"]})
        if "kl" in result:
            metrics["quality/kl_base"] = result["kl"]
    if cfg.tasks or cfg.local_tasks:
        from llmopt.eval.harness import evaluate_tasks
        from llmopt.progress import progress_bar

        started = time.perf_counter()
        with progress_bar(1, "lm-eval tasks", enabled=ctx.progress) as advance:
            task_metrics, info = evaluate_tasks(model, tokenizer, cfg, ctx.device, out)
            advance()
        metrics.update(task_metrics)
        metrics["time/lm_eval_s"] = time.perf_counter() - started
        report["lm_eval"] = {"metrics": task_metrics, **info}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return Artifact(out, "report", metrics, {**info, "environment": {"kernel": applied.tag()}})


def pair(cfg: Evaluate, candidate: Artifact, base: Artifact) -> Paired:
    """The runner's hook: paired metrics, gate verdicts and the quality table."""
    metrics, failed = paired(candidate, base, cfg.gates)
    return Paired(metrics, failed, {"quality.md": quality_table(metrics).encode()})


def paired(candidate: Artifact, base: Artifact, gates: Gates | None) -> tuple[dict[str, float], list[str]]:
    """(metrics, failed gates): the candidate's metrics beside the base model's under the same
    settings (`_base`), the perplexity change, each task metric's recovery, and the gates.

    Recovery is candidate / base for a metric that is better higher (accuracy) and base /
    candidate for one better lower (perplexity), so below 1 always means quality was lost."""
    c, b = candidate.metrics, base.metrics
    metrics = dict(c)
    if "quality/ppl" in c:
        metrics["quality/ppl_base"] = b["quality/ppl"]
        metrics["quality/ppl_delta_pct"] = 100.0 * (c["quality/ppl"] / b["quality/ppl"] - 1.0)
    for name, higher in candidate.info.get("higher_is_better", {}).items():
        metrics[f"{name}_base"] = b[name]
        numerator, denominator = (c[name], b[name]) if higher else (b[name], c[name])
        metrics[f"{name}_recovery"] = numerator / denominator if denominator else float("nan")
    failed = gate_failures(gates, metrics) if gates is not None else []
    if gates is not None:
        metrics["gates/passed"] = float(not failed)
    return metrics, failed


def gate_failures(gates: Gates, metrics: dict[str, float]) -> list[str]:
    failed = []
    if gates.min_recovery is not None:
        for name, value in sorted(metrics.items()):
            if name.endswith("_recovery") and not value >= gates.min_recovery:  # NaN fails too
                failed.append(f"{name}={value:.4f} < min_recovery {gates.min_recovery}")
    if gates.max_ppl_delta_pct is not None and not metrics["quality/ppl_delta_pct"] <= gates.max_ppl_delta_pct:
        failed.append(f"quality/ppl_delta_pct={metrics['quality/ppl_delta_pct']:.3f} > {gates.max_ppl_delta_pct}")
    for name, bound in gates.metrics.items():
        value = metrics[f"quality/{name}"]
        if bound.min is not None and not value >= bound.min:
            failed.append(f"quality/{name}={value:.4f} < min {bound.min}")
        if bound.max is not None and not value <= bound.max:
            failed.append(f"quality/{name}={value:.4f} > max {bound.max}")
    return failed


def quality_table(metrics: dict[str, float]) -> str:
    """Markdown: each task metric (and perplexity) for base and candidate, with the recovery."""
    lines = ["| metric | base | candidate | recovery |", "|---|---|---|---|"]
    if "quality/ppl_base" in metrics:
        lines.append(f"| perplexity | {metrics['quality/ppl_base']:.4f} | {metrics['quality/ppl']:.4f} | "
                     f"{metrics['quality/ppl_base'] / metrics['quality/ppl']:.4f} |")
    for name in sorted(k.removesuffix("_recovery") for k in metrics if k.endswith("_recovery")):
        stderr = metrics.get(f"{name}_stderr")
        shown = f"{metrics[name]:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
        lines.append(f"| {name.removeprefix('quality/')} | {metrics[f'{name}_base']:.4f} | {shown} | "
                     f"{metrics[f'{name}_recovery']:.4f} |")
    return "\n".join(lines) + "\n"
