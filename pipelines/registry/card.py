"""The model card: MODEL_CARD.md of a registry package, written from a run's metrics and tags."""

from __future__ import annotations

import json
import re

from llmopt.tables import beside_base


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def model_card(recipe, artifact, metrics: dict[str, float], lineage: str, gate_lines: list[str], run_tags: dict[str, str],
               run_id: str, base: dict | None = None) -> str:
    """Markdown: what was done, quality and performance base vs optimized, hardware, versions, how
    to serve it, known limits."""
    lines = [f"# {recipe.promote.model_name}", "", recipe.description or recipe.promote.description or "", "",
             "## What was done", "", f"Recipe `{recipe.name}` (sha256 {run_tags.get('llmopt.recipe_hash', '?')}), "
             f"MLflow run `{run_id}`.", "", f"Lineage: {lineage}", ""]
    if base:  # where the weights come from, and under which license
        lines += [f"Base model: {base.get('upstream') or base['source']}, revision `{base['revision']}`"
                  + (f"; license {base['license']}" if base.get("license") else ""), ""]
    quality = sorted({k.removesuffix("_base") for k in metrics
                      if k.startswith("quality/") and k.endswith("_base") and k.removesuffix("_base") in metrics})
    if quality:
        lines += ["## Quality (base vs optimized)", "", "| metric | base | optimized | ± stderr | recovery |",
                  "|---|---|---|---|---|"]
        for name in quality:
            lines.append(f"| {name.removeprefix('quality/')} | {_fmt(metrics.get(name + '_base'))} | {_fmt(metrics.get(name))} "
                         f"| {_fmt(metrics.get(name + '_stderr'))} | {_fmt(metrics.get(name + '_recovery'))} |")
        lines.append("")
    batches = sorted({int(k.rsplit("/bs", 1)[1]) for k in metrics if k.startswith("bench/") and re.search(r"/bs\d+$", k)})
    if batches:
        shown = [n for n in ("output_tok_s", "ttft_ms", "tpot_ms", "e2e_ms", "peak_allocated_gb", "usd_per_1m_output_tokens",
                             "energy_j_per_output_token") if any(f"bench/{n}/bs{bs}" in metrics for bs in batches)]
        lines += ["## Latency, throughput, memory, cost: optimized (base)", "",
                  *beside_base(metrics, "batch", [(str(bs), f"bench/{{}}/bs{bs}") for bs in batches],
                              [(n, "{:.4g}") for n in shown], column_suffix="", missing=""), ""]
    points = sorted({k.rsplit("/", 1)[1] for k in metrics if re.fullmatch(r"serve/output_tok_s/[cr][\d.]+", k)},
                    key=lambda p: float(p[1:]))
    if points:
        shown = [n for n in ("requests_s", "output_tok_s", "ttft_ms_p99", "itl_ms_p99", "error_rate", "usd_per_1m_output_tokens")
                 if any(f"serve/{n}/{p}" in metrics for p in points)]
        lines += ["## Under serving load (`runtime: server`): optimized (base)", "",
                  *beside_base(metrics, "load", [(p, f"serve/{{}}/{p}") for p in points], [(n, "{:.4g}") for n in shown],
                              column_suffix="", missing=""),
                  "", f"At the SLA: {_fmt(metrics.get('serve/tok_s_at_sla'))} output tokens/s "
                      f"(base {_fmt(metrics.get('serve/tok_s_at_sla_base'))}) at load "
                      f"{_fmt(metrics.get('serve/load_at_sla'))}.", ""]
    memory = {k: v for k, v in metrics.items() if k.startswith("memory/")}
    if memory:
        lines += ["## Memory", ""] + [f"- `{k}`: {_fmt(v)}" for k, v in sorted(memory.items())] + [""]
    lines += ["## Promotion gates", ""] + ([f"- {g}" for g in gate_lines] or ["- none"]) + [""]
    lines += ["## Hardware and versions", "", f"- hardware: {run_tags.get('llmopt.hardware', '?')}"]
    lines += [f"- {k.removeprefix('lib.')}: {v}" for k, v in sorted(run_tags.items()) if k.startswith("lib.")] + [""]
    lines += ["## How to serve it", ""] + _serving(artifact) + [""]
    lines += ["## Known limits", ""] + _limits(artifact, metrics) + [""]
    return "\n".join(lines)


def _serving(artifact) -> list[str]:
    info = artifact.info
    manifest_file = artifact.path / "manifest.json"
    if artifact.kind == "trtllm-bundle" and manifest_file.is_file():
        commands = json.loads(manifest_file.read_text()).get("commands", {})
        return ["From the `model/` folder, where TensorRT-LLM is installed (or in its container):", "", "```sh",
                *commands.values(), "```", "", "Check it first: `llmopt verify model/`."]
    return _method(info).card(info)


def _method(info: dict):
    """The quantization method that wrote the artifact, or the plain `Method` for an unquantized one."""
    from llmopt import methods

    fmt = info.get("format")
    return methods.by_format(fmt) if any(fmt in m.formats for m in methods.discover().values()) else methods.Method


def _limits(artifact, metrics: dict[str, float]) -> list[str]:
    limits = list(_method(artifact.info).limits(artifact.info))
    if metrics.get("trtllm/built") == 0:
        limits.append(f"- Not built or loaded by TensorRT-LLM when registered: "
                      f"{artifact.info.get('tags', {}).get('trtllm.reason', 'see the compile stage')}.")
    if not any(k.startswith("bench/") for k in metrics):
        limits.append("- No latency measured by this recipe.")
    return limits or ["- none recorded"]
