"""Model registry: promotion gates, registration with a model card, aliases, and pulling a
promoted artifact back with every sha256 checked.

A registered version's source is a package in the run's artifact store:

    MODEL_CARD.md     what was done, quality and performance tables, hardware, versions, serving
    manifest.json     sha256 of every file of the package (the card and model/ included)
    model/            the final artifact: a TensorRT-LLM bundle, or a checkpoint

Packages are keyed by the artifact's content hash: the same weights registered twice are uploaded
once (the second version points at the first upload), and registered under the same gates with
the same verdict they reuse their version instead of making one. Aliases move only after the package is
uploaded and the version exists, one `set_registered_model_alias` call each.
"""

from __future__ import annotations

import json
import operator
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CANDIDATE = "candidate"
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,254}$")  # MLflow's alias charset; `latest` and v<N> are reserved
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
PACKAGE_MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
MODEL_DIR = "model"
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*(?P<metric>[A-Za-z0-9_./-]+)\s*(?P<op>>=|<=|==|>|<)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)"
                   r"\s*(?P<base>\*\s*base)?\s*$")


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias) or alias == "latest" or re.fullmatch(r"v\d+", alias):
        raise ValueError(f"alias {alias!r}: use letters, digits, '-' and '_', starting with a letter "
                         "('latest' and v<number> are reserved by MLflow)")
    return alias


def check_promotion_alias(alias: str) -> str:
    """An alias a recipe or `llmopt promote` may move: valid, and not the reserved `candidate`."""
    if alias == CANDIDATE:
        raise ValueError(f"alias {CANDIDATE!r} is what a version that fails its gates gets; promote to another alias")
    return check_alias(alias)


# --- gates ---------------------------------------------------------------------------------------


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

BENCH = ("ttft_ms", "ttft_ms_p90", "ttft_ms_p99", "e2e_ms", "e2e_ms_p90", "e2e_ms_p99", "itl_ms", "itl_ms_p90",
         "itl_ms_p99", "tpot_ms", "output_tok_s", "total_tok_s", "requests_s", "e2e_spread_pct", "decode_bandwidth_gb_s",
         "roofline_fraction", "usd_per_1m_output_tokens", "peak_allocated_gb", "peak_reserved_gb",
         "energy_j_per_output_token", "power_w", "overhead_pct")


def known_metrics(recipe) -> tuple[set[str], set[str]]:
    """(metric names the recipe's stages log on the parent run, prefixes of names only known at
    run time: a standard lm-eval task's metrics)."""
    from llmopt.eval.harness import local_task_metrics

    names: set[str] = set()
    prefixes: set[str] = set()
    for cfg in recipe.stages:
        if cfg.stage == "distill":
            names |= {f"distill/{n}" for n in ("loss_kd", "loss_ce", "loss_hidden", "loss_total", "lr",
                                               "eval_ppl_student", "eval_ppl_teacher", "tokens_per_s",
                                               "teacher_params", "student_params")}
        elif cfg.stage == "quantize":
            names |= {"memory/weights_gb", "memory/weights_gb_base", "memory/compression_ratio"}
        elif cfg.stage == "evaluate":
            if cfg.perplexity is not None:
                names |= {f"quality/{n}" for n in ("ppl", "ppl_base", "ppl_delta_pct", "kl_base", "nll", "eval_tokens")}
            tasks: dict[str, set[str]] = {}
            for path in cfg.local_tasks:
                tasks.update(local_task_metrics(path))
            for task, metrics in tasks.items():
                for metric in metrics:
                    names |= {f"quality/{task}/{metric}{suffix}" for suffix in ("", "_stderr", "_base", "_recovery")}
            prefixes |= {f"quality/{task}/" for task in cfg.tasks}
            if cfg.gates is not None:
                names.add("gates/passed")
        elif cfg.stage == "benchmark":
            names |= {"memory/weights_gb", "memory/weights_gb_base", "memory/kv_bytes_per_token",
                      "memory/kv_tokens_in_budget", "memory/budget_gb", "bench/bandwidth_measured_gb_s"}
            for bs in cfg.batch_sizes:
                names |= {f"bench/{n}/bs{bs}{suffix}" for n in BENCH for suffix in ("", "_base")}
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


def content_digest(path: Path) -> str:
    """sha256 over every file's name and sha256 (not the cache's record nor a bundle's manifest,
    which carry run-specific facts): the same weights and files give the same digest."""
    import hashlib

    from llmopt.export.manifest import file_digests

    return hashlib.sha256(json.dumps(file_digests(path), sort_keys=True).encode()).hexdigest()


# --- packages ----------------------------------------------------------------------------------------


def _link_tree(src: Path, dest: Path) -> None:
    from llmopt.export.manifest import link_or_copy

    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        link_or_copy(file, dest / file.relative_to(src))


def write_package(artifact: Path, card: str, dest: Path, body: dict) -> dict:
    """The registry package in `dest`: model/, the card, and a manifest of every file's sha256."""
    from llmopt.export.manifest import file_digests

    _link_tree(artifact, dest / MODEL_DIR)
    (dest / MODEL_DIR / "artifact.json").unlink(missing_ok=True)  # the stage cache's bookkeeping
    (dest / CARD).write_text(card)
    manifest = {"schema": 1, **body, "files": file_digests(dest)}
    (dest / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_package(root: Path) -> list[str]:
    """Files that differ from the package manifest (empty: intact)."""
    from llmopt.export.manifest import compare_digests

    path = root / PACKAGE_MANIFEST
    if not path.is_file():
        return [f"{PACKAGE_MANIFEST} is missing: not an llmopt package"]
    return compare_digests(json.loads(path.read_text()).get("files", {}), root)


# --- registration -------------------------------------------------------------------------------------


@dataclass
class Registration:
    name: str
    version: str
    alias: str  # the alias this version got: the recipe's, or `candidate`
    failed: list[str]
    reused_upload: bool
    reused_version: bool = False  # the same content under the same gates, with the same verdict: no new version
    note: str = ""  # why a version was reused, or why the same content got a new one; empty for new content


def _retry(call, attempts: int = 8):
    """SQLite stores refuse a writer while another holds the lock ("database is locked"): retry."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as e:
            if "locked" not in str(e).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def register(tracker, promote, run_id: str, artifact: Path, metrics: dict[str, float], card: str, tags: dict[str, str],
             digest: str) -> Registration:
    """Upload the package (once per content), create the version with its tags, then move the
    alias: the recipe's when every gate passes, else `candidate`. A version that already holds this
    content under the same gates with the same verdict (a warm re-run) is reused: it gets this run
    as `llmopt.last_run_id` and the alias, and no new version is made."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    gates = [Gate.parse(g) for g in promote.gates]
    lines, failed = judge(gates, metrics)
    try:
        _retry(lambda: client.create_registered_model(promote.model_name, description=promote.description))
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    existing = sorted((v for v in _retry(lambda: client.search_model_versions(f"name = '{promote.model_name}'"))
                       if v.tags.get("llmopt.content_sha256") == digest), key=lambda v: int(v.version))
    alias = promote.alias if not failed else CANDIDATE
    passed = str(not failed).lower()
    same = [v for v in existing if _gate_specs(v) == promote.gates and v.tags.get("llmopt.gates_passed") == passed]
    if same:  # a warm re-run: the version that holds this content under these gates, with this verdict
        version = same[-1]
        registrations = int(version.tags.get("llmopt.registrations", "1")) + 1
        _retry(lambda: client.set_model_version_tag(promote.model_name, version.version, "llmopt.last_run_id", run_id))
        _retry(lambda: client.set_model_version_tag(promote.model_name, version.version, "llmopt.registrations",
                                                    str(registrations)))
        _retry(lambda: client.set_registered_model_alias(promote.model_name, alias, version.version))
        note = f"reused version {version.version}: same content (sha256 {digest[:12]}) and gates, no new version"
        return Registration(promote.model_name, str(version.version), alias, failed, True, True, note)
    note = ""
    if existing:  # the same weights judged by other gates, or judged otherwise now: a version of its own
        newest = existing[-1]
        why = ("this recipe's gates differ from that version's" if _gate_specs(newest) != promote.gates else
               f"its gates {'passed' if newest.tags.get('llmopt.gates_passed') == 'true' else 'failed'} there and "
               f"{'pass' if not failed else 'fail'} with this run's metrics")
        note = f"new version: same content as version {newest.version} (not uploaded again), but {why}"
    reused = bool(existing)
    if existing:
        source = existing[0].source  # the same weights: no second upload
    else:
        folder = f"registry/{digest[:16]}"
        with tempfile.TemporaryDirectory() as tmp:
            write_package(artifact, card, Path(tmp), {"model_name": promote.model_name, "content_sha256": digest,
                                                      "run_id": run_id})
            client.log_artifacts(run_id, tmp, folder)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{folder}"
    version_tags = {**tags, "llmopt.content_sha256": digest, "llmopt.gate_specs": json.dumps(promote.gates),
                    "llmopt.gates": json.dumps(lines), "llmopt.gates_passed": str(not failed).lower()}
    version = _retry(lambda: client.create_model_version(promote.model_name, source, run_id=run_id, tags=version_tags))
    for _ in range(100):  # file and SQLite stores are READY at once; a remote registry may take a moment
        if client.get_model_version(promote.model_name, version.version).status == "READY":
            break
        time.sleep(0.1)
    _retry(lambda: client.set_registered_model_alias(promote.model_name, alias, version.version))
    return Registration(promote.model_name, str(version.version), alias, failed, reused, False, note)


def _gate_specs(version) -> list[str] | None:
    return json.loads(version.tags["llmopt.gate_specs"]) if "llmopt.gate_specs" in version.tags else None


def promote_version(tracker, name: str, version: str, alias: str, force: bool, reason: str | None) -> list[str]:
    """Re-check a version's gates against its run's metrics and move `alias` to it; with `force`,
    move it anyway and record the reason on the version. Returns the failing gates (empty: passed)."""
    client = tracker.client
    mv = client.get_model_version(name, version)
    specs = json.loads(mv.tags.get("llmopt.gate_specs", "[]"))
    metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
    _, failed = judge([Gate.parse(s) for s in specs], metrics)
    if failed and not force:
        return failed
    if force:
        client.set_model_version_tag(name, version, "llmopt.forced_promotion",
                                     json.dumps({"alias": alias, "reason": reason, "failed_gates": failed}))
    _retry(lambda: client.set_registered_model_alias(name, alias, version))
    return failed if force else []


def resolve(tracker, ref: str):
    """`NAME@ALIAS` or `NAME/VERSION` -> the model version (ValueError naming what is missing)."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    if "@" in ref:
        name, alias = ref.split("@", 1)
        getter = lambda: client.get_model_version_by_alias(name, alias)  # noqa: E731
        missing = f"model {name!r} has no alias {alias!r}"
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        getter = lambda: client.get_model_version(name, version)  # noqa: E731
        missing = f"model {name!r} has no version {version!r}"
    else:
        raise ValueError(f"{ref!r}: name a version as NAME@ALIAS or NAME/VERSION")
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"no registered model named {name!r}") from None
    try:
        return getter()
    except MlflowException:
        aliases = sorted(client.get_registered_model(name).aliases)
        raise ValueError(f"{missing} (aliases: {', '.join(aliases) or 'none'})") from None


def pull(tracker, ref: str, dest: Path, overwrite: bool) -> tuple[Any, list[str]]:
    """Download a version's package into `dest` and check every sha256. A damaged download is
    left in a temporary folder and reported; `dest` receives only a verified package."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} is not empty; pass --overwrite to replace its contents")
    mv = resolve(tracker, ref)
    staging = Path(tempfile.mkdtemp(prefix="llmopt-pull-", dir=dest.parent if dest.parent.exists() else None))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(staging),
                                                     tracking_uri=tracker.uri))
    problems = verify_package(local)
    if problems:
        return mv, [f"{p} (download kept in {local} for inspection)" for p in problems]
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(local), dest)
    shutil.rmtree(staging, ignore_errors=True)
    return mv, []


# --- the model card ------------------------------------------------------------------------------------


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
                  "| batch | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|"]
        for bs in batches:
            cells = [_fmt(metrics.get(f"bench/{n}/bs{bs}")) + (f" ({_fmt(metrics[f'bench/{n}/bs{bs}_base'])})"
                                                               if f"bench/{n}/bs{bs}_base" in metrics else "")
                     for n in shown]
            lines.append(f"| {bs} | " + " | ".join(cells) + " |")
        lines.append("")
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
    fmt = info.get("format")
    if fmt == "modelopt":
        return ["A ModelOpt unified checkpoint (`hf_quant_config.json`): serve `model/` with TensorRT-LLM's PyTorch "
                "backend (`trtllm-serve model --backend pytorch`). transformers cannot load it correctly."]
    extra = {"gptq": " (needs `optimum` and `gptqmodel`; name the kernel, e.g. `GPTQConfig(bits=4, backend=...)`)",
             "bnb": " (needs `bitsandbytes`)"}.get(fmt, "")
    return [f"`AutoModelForCausalLM.from_pretrained('model', use_safetensors=True)`{extra}; vLLM and SGLang load the "
            "same folder."]


def _limits(artifact, metrics: dict[str, float]) -> list[str]:
    limits = []
    if artifact.info.get("format") == "modelopt":
        limits.append("- Quality was measured on the fake-quantized model in memory (ModelOpt), not on a TensorRT-LLM engine.")
    if metrics.get("trtllm/built") == 0:
        limits.append(f"- Not built or loaded by TensorRT-LLM when registered: "
                      f"{artifact.info.get('tags', {}).get('trtllm.reason', 'see the compile stage')}.")
    if not any(k.startswith("bench/") for k in metrics):
        limits.append("- No latency measured by this recipe.")
    return limits or ["- none recorded"]
