"""lm-eval-harness on the in-memory model: standard tasks by name, local tasks from YAML.

The model is evaluated as the stage loaded it (bitsandbytes, GPTQ kernels, fake-quantized
weights), wrapped in lm-eval's `HFLM`. Every setting that changes scores (few-shot count, limit,
chat template, BOS token, max length, batch size, seeds) is returned so that it is recorded.
Metric names: `quality/<task>/<metric>` (`<metric>_<filter>` when a task filters its outputs),
with `_stderr` beside them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from llmopt.eval.backends import Backend

SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
BOOTSTRAP_ITERS = 1000  # standard errors of non-mean aggregations (lm-eval's default, 100000, is slow)


def task_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{path}: no task YAML there (a folder with *.yaml files, or a .yaml file)")
    return files


def load_local_task(file: Path, resolve_functions: bool = True) -> dict[str, Any]:
    """One task config; `data_files` resolved against the YAML's folder and checked to exist.
    `resolve_functions=False` parses without importing `!function` code and without importing
    lm-eval (validation); True uses lm-eval's own loader (the run)."""
    import yaml

    try:
        if resolve_functions:
            from lm_eval.tasks._yaml_loader import load_yaml

            config = load_yaml(file, resolve_func=True)
        else:
            config = task_yaml(file)
    except (yaml.YAMLError, ValueError, OSError) as e:
        raise ValueError(f"{file}: task YAML does not parse: {' '.join(str(e).split())}") from None
    if "task" not in config:
        raise ValueError(f"{file}: no `task:` name")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        resolved = {}
        for split, name in (files.items() if isinstance(files, dict) else [("test", files)]):
            data = Path(name) if Path(name).is_absolute() else file.parent / name
            if not data.is_file():
                raise ValueError(f"{file}: data file {data} (split {split!r}) does not exist")
            resolved[split] = str(data)
        config["dataset_kwargs"] = {**config["dataset_kwargs"], "data_files": resolved}
    return config


def task_yaml(file: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it without resolving code: `!function x.y` stays a path string,
    and `include:` files (relative to the YAML) are merged underneath, the including file winning."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: str(file.parent / loader.construct_scalar(node)))
    config = yaml.load(file.read_text(encoding="utf-8"), Loader=Loader) or {}
    if not isinstance(config, dict):
        raise ValueError("a task YAML is a mapping")
    included = config.pop("include", None) or []
    merged: dict[str, Any] = {}
    for name in [included] if isinstance(included, str) else included:
        merged.update(task_yaml(Path(name) if Path(name).is_absolute() else file.parent / name))
    return {**merged, **config}


def local_task_metrics(path: Path) -> dict[str, set[str]]:
    """task name -> the metric names it reports, for every task YAML under `path`."""
    out = {}
    for file in task_files(path):
        config = load_local_task(file, resolve_functions=False)
        out[config["task"]] = produced_metrics(config)
    return out


def produced_metrics(config: dict) -> set[str]:
    metrics = [m["metric"] for m in config.get("metric_list") or []]
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    return {metric_name(m, f) for m in metrics for f in filters}


def metric_name(metric: str, filter_name: str) -> str:
    return metric if filter_name == "none" else f"{metric}_{filter_name}"


@functools.cache
def _task_manager():
    """lm-eval's index of its standard tasks (about 7 s to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def standard_tasks(cache_root: Path) -> dict[str, str | None]:
    """lm-eval's standard task names -> their YAML file (None for a group or a Python task). Built
    from lm-eval's TaskManager once per lm-eval version (seconds) and kept as JSON in the cache,
    so that validation neither imports lm-eval nor rebuilds its index."""
    from importlib import metadata

    from llmopt.cache import Cache

    def build() -> dict[str, str | None]:
        return {name: (str(entry.yaml_path) if entry.yaml_path else None) for name, entry in _task_manager().task_index.items()}

    return Cache(cache_root).remembered("lm-eval-tasks", metadata.version("lm_eval"), build)


def check_standard_tasks(names: list[str], gated_metrics: list[str], cache_root: Path) -> None:
    """Each name is a task, group or tag lm-eval knows (else close matches are listed), and each
    gated `task/metric` of a standard task is one the task reports."""
    import difflib

    index = standard_tasks(cache_root)
    for position, name in enumerate(names):
        if name not in index:
            close = difflib.get_close_matches(name, sorted(index), n=5, cutoff=0.6)
            raise ValueError(f"tasks[{position}]: {name!r} is not an lm-eval task"
                             + (f"; close matches: {', '.join(close)}" if close else ""))
    for gated in gated_metrics:
        task, _, metric = gated.partition("/")
        if index[task] is None:
            continue  # a group or a Python task: its metrics are only known once it is built
        produced = produced_metrics(task_yaml(Path(index[task])))
        if metric not in produced:
            raise ValueError(f"gates.metrics: {task} reports {', '.join(sorted(produced))}, not {metric!r}")


def offline_blockers(names: list[str], cache_root: Path) -> str | None:
    """Why standard tasks cannot run on this machine: their datasets come from the hub, and this
    run is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) without them in the local datasets cache."""
    import os

    offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").lower() in ("1", "true")]
    if not offline:
        return None
    from datasets import config

    cached = {p.name for p in Path(config.HF_DATASETS_CACHE).glob("*")} if Path(config.HF_DATASETS_CACHE).is_dir() else set()
    missing = [n for n in names if not any(c.startswith(_dataset_cache_prefix(n, cache_root)) for c in cached)]
    if missing:
        return (f"{', '.join(missing)}: the task data comes from the hub, and this run is offline ({offline[0]}=1) "
                "without it in the local datasets cache; use local_tasks, or run where the hub is reachable")
    return None


def _dataset_cache_prefix(task: str, cache_root: Path) -> str:
    """The datasets-cache folder prefix of a standard task's dataset (org___name), or a prefix no
    folder has when the task is a group: from the cached task index, as `check_standard_tasks` reads it."""
    path = standard_tasks(cache_root).get(task)
    dataset = task_yaml(Path(path)).get("dataset_path") if path else None
    return dataset.replace("/", "___") if dataset else "\0"


def evaluate_tasks(model, tokenizer, cfg, device: str, out: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, info): the tasks' metrics and standard errors; info holds the settings used and
    which metrics are better higher. Writes `lm_eval_results.json` and `samples/<task>.jsonl`."""
    from llmopt.models import output_to
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    local = [load_local_task(f) for path in cfg.local_tasks for f in task_files(path)]
    settings = {"num_fewshot": cfg.num_fewshot, "limit": cfg.limit, "batch_size": cfg.batch_size,
                "max_length": cfg.max_length, "apply_chat_template": cfg.apply_chat_template,
                "bootstrap_iters": BOOTSTRAP_ITERS, **SEEDS}
    with output_to(out / "lm_eval.log"):  # lm-eval's own bars and notices
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                  add_bos_token=cfg.add_bos_token, device=device)
        results = simple_evaluate(
            model=lm, tasks=[*cfg.tasks, *local], num_fewshot=cfg.num_fewshot, limit=cfg.limit,
            apply_chat_template=cfg.apply_chat_template, log_samples=True, bootstrap_iters=BOOTSTRAP_ITERS,
            task_manager=TaskManager(include_defaults=bool(cfg.tasks)), **SEEDS,
        )
    settings["add_bos_token"] = bool(lm.add_bos_token)
    settings["max_length"] = lm.max_length
    metrics, higher = {}, {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            name = f"quality/{task}/{metric_name(metric, filter_name)}"
            metrics[name] = float(value)
            stderr = values.get(f"{metric}_stderr,{filter_name}")
            if isinstance(stderr, int | float):
                metrics[f"{name}_stderr"] = float(stderr)
            higher[name] = bool(results["higher_is_better"].get(task, {}).get(metric, True))
    samples = results.pop("samples", {})
    (out / "samples").mkdir(exist_ok=True)
    for task, rows in samples.items():
        kept = rows[: cfg.log_samples]
        (out / "samples" / f"{task}.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in kept))
    (out / "lm_eval_results.json").write_text(json.dumps(results, indent=1, default=str))
    return metrics, {"settings": settings, "higher_is_better": higher}


def _metrics(cfg) -> tuple[set[str], set[str]]:
    """Local tasks' metrics are read from their YAML (with stderr, base twin and recovery);
    standard tasks' only once lm-eval runs them: a prefix."""
    names: set[str] = set()
    tasks: dict[str, set[str]] = {}
    for path in cfg.local_tasks:
        tasks.update(local_task_metrics(path))
    for task, metrics in tasks.items():
        for metric in metrics:
            names |= {f"quality/{task}/{metric}{suffix}" for suffix in ("", "_stderr", "_base", "_recovery")}
    return names, {f"quality/{task}/" for task in cfg.tasks}


BACKEND = Backend("lm-eval", lambda cfg: bool(cfg.tasks or cfg.local_tasks), ("lm_eval",), _metrics)
