"""What a run prints: one line per stage as it finishes, then a table of the metrics people compare."""

from __future__ import annotations

from llmopt.runner import RunSummary, StageOutcome
from rich.console import Console
from rich.table import Table

# Metrics shown in the closing table, in this order, with their display format.
SHOWN = {
    "distill/teacher_params": "{:,.0f}",
    "distill/student_params": "{:,.0f}",
    "distill/eval_ppl_teacher": "{:.4f}",
    "distill/eval_ppl_student": "{:.4f}",
    "distill/tokens_per_s": "{:,.0f}",
    "quality/ppl_base": "{:.4f}",
    "quality/ppl": "{:.4f}",
    "quality/ppl_delta_pct": "{:+.3f}%",
    "quality/kl_base": "{:.5f} nats/token",
    "memory/weights_gb_base": "{:.4f} GB",
    "memory/weights_gb": "{:.4f} GB",
    "memory/compression_ratio": "{:.2f}x",
    "memory/peak_gpu_gb": "{:.2f} GB",
    "memory/bundle_gb": "{:.4f} GB",
    "trtllm/built": "{:.0f}",
}


def print_stage(console: Console, outcome: StageOutcome) -> None:
    state = "[green]cache hit[/]" if outcome.hit else f"[yellow]computed[/] in {outcome.seconds:.1f}s"
    console.print(f"  stage [bold]{outcome.name}[/]: {state}  key {outcome.key}")


def print_summary(console: Console, summary: RunSummary) -> None:
    table = Table(title=f"{summary.recipe}: results")
    table.add_column("stage")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for outcome in summary.stages:
        for name, fmt in SHOWN.items():
            if name in outcome.metrics:
                table.add_row(outcome.name, name, fmt.format(outcome.metrics[name]))
    console.print(table)
    for outcome in summary.stages:
        for name, text in outcome.tables.items():
            from rich.markdown import Markdown
            from rich.text import Text

            # the heading as text, not a Markdown paragraph (rich pads those to the console's full width)
            console.print(Text.assemble((f"{outcome.name}: base vs candidate", "bold"), f" ({name})"))
            console.print(Markdown(text))
        if outcome.note:
            console.print(f"{outcome.name}: {outcome.note}")
        if "gates/passed" in outcome.metrics:
            verdict = "[green]passed[/]" if not outcome.failed_gates else "[red]FAILED[/]: " + "; ".join(outcome.failed_gates)
            console.print(f"gates ({outcome.name}): {verdict}")
    if (reg := summary.registration) is not None:
        upload = f" ({reg.note})" if reg.note else ""
        if reg.failed:
            console.print(f"registered [bold]{reg.name}[/] version {reg.version} as [yellow]{reg.alias}[/]{upload}: "
                          f"promotion gates failed: " + "; ".join(reg.failed))
        else:
            console.print(f"registered [bold]{reg.name}[/] version {reg.version}, alias [green]{reg.alias}[/]{upload}")
    hits = sum(s.hit for s in summary.stages)
    console.print(f"{hits}/{len(summary.stages)} stages from cache. MLflow run {summary.run_id} "
                  f"(experiment {summary.recipe!r}): {summary.tracking_hint}. Log: {summary.log_file}")
