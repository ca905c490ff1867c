"""Promotion gates: `metric op number` (or `* base`) parsed, judged against a run's metrics, and
checked before a run against the catalogue of metrics the recipe's stages log."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*(?P<metric>[A-Za-z0-9_./-]+)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)"
                   r"\s*(?P<base>\*\s*base)?\s*$")


@dataclass(frozen=True)
class Gate:
    """`metric op number`, or `metric op number * base` (against the metric's `_base` twin)."""

    text: str
    metric: str
    op: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Gate:
        m = _GATE.match(text)
        if m is None:
            raise ValueError(f"gate {text!r}: write `metric >= number` or `metric <= number * base` "
                             f"(operators: {', '.join(OPS)})")
        metric = m["metric"]
        if re.search(r"_p50(/|$)", metric):  # the median is logged without a suffix
            metric = re.sub(r"_p50(/|$)", r"\1", metric)
        return cls(text.strip(), metric, m["op"], float(m["value"]), m["base"] is not None)

    @property
    def base_metric(self) -> str:
        """`bench/tpot_ms/bs1` -> `bench/tpot_ms/bs1_base`; `memory/weights_gb` -> `memory/weights_gb_base`."""
        return f"{self.metric}_base"

    def judge(self, metrics: dict[str, float]) -> tuple[bool, str]:
        if self.metric not in metrics:
            return False, f"{self.text}: {self.metric} was not logged by this run"
        actual = metrics[self.metric]
        bound = self.value
        if self.relative:
            if self.base_metric not in metrics:
                return False, f"{self.text}: {self.base_metric} was not logged by this run"
            bound = self.value * metrics[self.base_metric]
        passed = OPS[self.op](actual, bound)
        return passed, f"{self.metric} = {actual:.6g} {'' if passed else 'NOT '}{self.op} {bound:.6g}"


def judge(gates: list[Gate], metrics: dict[str, float]) -> tuple[list[str], list[str]]:
    """(every gate's verdict line, the failing ones)."""
    lines, failed = [], []
    for gate in gates:
        ok, line = gate.judge(metrics)
        lines.append(("pass: " if ok else "FAIL: ") + line)
        if not ok:
            failed.append(line)
    return lines, failed


# --- which metrics a recipe logs --------------------------------------------------------------------

def known_metrics(recipe) -> tuple[set[str], set[str]]:
    """(metric names the recipe's stages log on the parent run, prefixes of names only known at
    run time: a standard lm-eval task's metrics)."""
    names: set[str] = set()
    prefixes: set[str] = set()
    for cfg in recipe.stages:
        if cfg.stage == "distill":
            names |= {f"distill/{n}" for n in ("loss_kd", "loss_ce", "loss_hidden", "loss_total", "lr",
                                               "eval_ppl_student", "eval_ppl_teacher", "tokens_per_s",
                                               "teacher_params", "student_params")}
        elif cfg.stage == "quantize":
            from llmopt import methods

            names |= {*methods.COMMON_METRICS, *methods.get(cfg.method).metrics}
        elif cfg.stage == "evaluate":
            from llmopt.eval import backends

            for backend in backends.enabled(cfg):
                found, pending = backend.metrics(cfg)
                names |= found
                prefixes |= pending
            if cfg.gates is not None:
                names.add("gates/passed")
        elif cfg.stage == "benchmark":
            from llmopt.eval import runtimes
            from llmopt.eval.bench import reported_metrics
            from llmopt.kernels import Applied

            if cfg.runtime == "server":
                from llmopt.eval.runtimes.server import metric_names

                names |= metric_names(cfg)
                continue
            measured = reported_metrics(runtimes.get(cfg.runtime).measures)
            names |= set(Applied("none").metrics())  # kernel/build_s, prepare_s, layers, layers_dequantized
            names |= {"memory/weights_gb", "memory/weights_gb_base", "memory/kv_bytes_per_token",
                      "memory/kv_tokens_in_budget", "memory/budget_gb", "bench/bandwidth_measured_gb_s"}
            for bs in cfg.batch_sizes:
                names |= {f"bench/{n}/bs{bs}{suffix}" for n in measured for suffix in ("", "_base")}
        elif cfg.stage == "compile":
            names |= {"trtllm/built", "trtllm/smoke_tokens", "memory/bundle_gb"}
    names.add("memory/peak_gpu_gb")
    return names, prefixes


def check_gates(gates: list[Gate], recipe) -> None:
    """ValueError for a gate on a metric the recipe's stages never log, with the list of those that are."""
    names, prefixes = known_metrics(recipe)
    for gate in gates:
        wanted = [gate.metric] + ([gate.base_metric] if gate.relative else [])
        for metric in wanted:
            if metric not in names and not any(metric.startswith(p) for p in prefixes):
                import difflib

                close = difflib.get_close_matches(metric, sorted(names), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"gate {gate.text!r}: no stage of this recipe logs {metric!r}{hint} "
                                 f"(known: {', '.join(sorted(names))})")
