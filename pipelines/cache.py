"""Content-addressed stage outputs with atomic commit, so the same command resumes after a crash.

An entry is `<root>/stages/<key>/` holding the stage's files and `artifact.json`, written last.
A stage builds into `<key>.tmp/`, which is renamed to `<key>/` only once complete, and only a
directory with `artifact.json` counts as a hit: a process killed mid-stage (even `kill -9`)
leaves at most a `.tmp` directory, which the next run discards and rebuilds.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import pkgutil
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "LLMOPT_CACHE_DIR"
RECORD = "artifact.json"


@dataclass(frozen=True)
class Artifact:
    """What a stage produces: a directory, what kind of thing it holds, and its metrics."""

    path: Path
    kind: str  # "hf-checkpoint" | "report"
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # stage-specific facts, e.g. how to reload


@dataclass(frozen=True)
class Entry:
    key: str
    artifact: Artifact
    record: dict[str, Any]
    hit: bool


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, ".cache/llmopt"))


def content_key(identity: dict) -> str:
    """The one key function: a short sha256 of everything (JSON) that decides a cached thing."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def stage_key(parent: str, stage: str, config: dict, libraries: dict[str, str], hardware: str,
              code: dict[str, str]) -> str:
    """Key of a stage's output; `code`: `stage_code` of the stage's module (llmopt's version, sources)."""
    return content_key({"parent": parent, "stage": stage, "config": config, "libraries": libraries, "hardware": hardware,
                        "code": code})


# modules that keep records, check settings or show progress: the settings enter a key by value
NOT_OUTPUT = frozenset({"cache", "errors", "plots", "progress", "recipe", "registry", "schema", "tracking"})


@functools.cache
def stage_code(module: str) -> dict[str, str]:
    """Which llmopt computes a stage: the installed llmopt's version and `source_digest` of the
    stage's module, so that a fix to the perplexity or benchmark code is a cache miss. Once per process."""
    from importlib import metadata

    return {"llmopt": metadata.version("llmopt"), "sources": source_digest(module)}


@functools.cache
def source_digest(module: str) -> str:
    """sha256 over the source files of `module` and of every module of its package it imports,
    directly or through another (imports inside functions too; not NOT_OUTPUT)."""
    total = hashlib.sha256()
    for name, path in sorted(code_sources(module).items()):
        total.update(f"{name}\0{file_sha256(path)}\n".encode())
    return total.hexdigest()[:24]


def code_sources(module: str) -> dict[str, Path]:
    """`module` and the modules of its package it imports, transitively: name -> source file. A
    package that discovers its modules (llmopt.methods) brings all of them."""
    import ast
    from importlib.util import find_spec, resolve_name

    package = module.partition(".")[0]
    skipped = {f"{package}.{name}" for name in NOT_OUTPUT}
    found: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found or name in skipped:
            continue
        spec = find_spec(name)
        found[name] = Path(spec.origin)
        here = name if spec.submodule_search_locations is not None else name.rpartition(".")[0]
        tree = ast.parse(found[name].read_text(), str(spec.origin))
        if spec.submodule_search_locations is not None and _discovers_modules(tree):
            todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(spec.submodule_search_locations)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names if alias.name.partition(".")[0] == package]
            elif isinstance(node, ast.ImportFrom):
                base = resolve_name("." * node.level + (node.module or ""), here) if node.level else node.module
                if base.partition(".")[0] != package:
                    continue
                todo.append(base)  # and each imported name that is a module of its own
                if find_spec(base).submodule_search_locations is not None:
                    todo += [f"{base}.{alias.name}" for alias in node.names if find_spec(f"{base}.{alias.name}")]
    return found


def _discovers_modules(tree) -> bool:
    """A package whose modules register themselves through llmopt.plugins (llmopt.methods,
    llmopt.eval.runtimes): each of its modules counts as imported."""
    import ast

    return any(isinstance(node, ast.ImportFrom) and node.module == "llmopt.plugins" for node in tree.body)


class Cache:
    def __init__(self, root: Path):
        self.root = root.resolve()  # stages may change directory; entries stay where they are
        self.stages = self.root / "stages"

    def lookup(self, key: str) -> Entry | None:
        entry = self.stages / key
        record_path = entry / RECORD
        if not record_path.is_file():
            return None
        record = json.loads(record_path.read_text())
        a = record["artifact"]
        return Entry(key, Artifact(entry, a["kind"], a["metrics"], a["info"]), record, hit=True)

    def build(self, key: str, record: dict[str, Any], produce: Callable[[Path], Artifact],
              resumable: bool = False) -> Entry:
        """Run `produce(tmp_dir)` and commit its output under `key`, unless another process did.

        What a killed run left in `<key>.tmp` is discarded, unless the stage is `resumable`: then it
        is handed to `produce` again (same key, so same config), which continues from its checkpoints."""
        with self._lock(key):
            found = self.lookup(key)
            if found is not None:
                return found
            tmp = self.stages / f"{key}.tmp"
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
            artifact = produce(tmp)
            if artifact.path != tmp:
                raise RuntimeError(f"stage wrote its artifact to {artifact.path}, not to {tmp}")
            as_json = {k: v for k, v in asdict(artifact).items() if k != "path"}
            full = {**record, "key": key, "artifact": as_json}
            _write_durably(tmp / RECORD, json.dumps(full, indent=2, sort_keys=True))
            final = self.stages / key
            shutil.rmtree(final, ignore_errors=True)  # an incomplete entry without a record
            os.rename(tmp, final)
            _fsync_dir(self.stages)
            return Entry(key, Artifact(final, artifact.kind, artifact.metrics, artifact.info), full, hit=False)

    def invalidate(self, key: str) -> None:
        with self._lock(key):
            shutil.rmtree(self.stages / key, ignore_errors=True)

    # What outlives a stage's output beside it (converted models, teacher logits, measured device
    # bandwidth, file digests, lm-eval's task index): the same lock per name, the same atomic commit.

    def folder(self, kind: str, name: str, build: Callable[[Path], None]) -> Path:
        """`<root>/<kind>/<name>/`, built once by `build(tmp_dir)` under the lock and renamed into
        place when complete: a folder that exists is whole."""
        final = self.root / kind / name
        with self._lock(f"{kind}-{name}"):
            if not final.is_dir():
                with atomic_dir(final) as tmp:
                    build(tmp)
        return final

    def remembered(self, name: str, key: str, compute: Callable[[], Any]) -> Any:
        """`compute()`'s value for `key` in the JSON file `<root>/<name>.json`, computed once
        (under the lock) and kept for later runs."""
        path = self.root / f"{name}.json"
        with self._lock(name):
            known = json.loads(path.read_text()) if path.is_file() else {}
            if key not in known:
                known[key] = compute()
                write_atomically(path, json.dumps(known, indent=1, sort_keys=True))
        return known[key]

    @contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        """One builder per key across processes; a second waits, then finds the entry."""
        self.stages.mkdir(parents=True, exist_ok=True)
        with open(self.stages / f"{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A name private to this process to write `path`'s new content to; renamed over `path` when
    the block completes, so a reader sees the old file or the new one, never a part. The one
    write-then-rename for files (`atomic_dir` is the one for directories)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir(source: Path, dest: Path) -> None:
    """Put a finished directory (a verified download) at `dest`, replacing what was there: the
    helper for moving a whole folder into place (a rename where both are on one filesystem)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source), dest)
    _fsync_dir(dest.parent)


def write_atomically(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        _write_durably(tmp, text)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a private temporary name and rename it into place only when the block
    completes: readers see the whole directory or none. Concurrent builders each use their own
    temporary directory; the first to finish wins and the others discard theirs."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():  # another process finished first: identical content by construction
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
            _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def key_config(config: Any) -> Any:
    """A (JSON-dumped) config for hashing: local data files enter by content, not by path."""
    if isinstance(config, dict):
        out = {k: key_config(v) for k, v in config.items()}
        if config.get("path") and "text_field" in config:
            out["path"] = "sha256:" + file_sha256(Path(config["path"]))
        if config.get("local_tasks"):  # task YAML and data files
            out["local_tasks"] = [("sha256:" + file_sha256(Path(p))) if Path(p).is_file() else directory_digest(Path(p))
                                  for p in config["local_tasks"]]
        return out
    return config


def directory_digest(path: Path, memo_file: Path | None = None) -> str:
    """Content hash of a model directory (file names and bytes), memoised by (size, mtime).

    Hashing 26 GB of weights takes a while, so each file's digest is remembered in `memo_file`
    and reused while its size and modification time are unchanged.
    """
    memo: dict[str, Any] = {}
    if memo_file is not None and memo_file.is_file():
        memo = json.loads(memo_file.read_text())
    total = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        cached = memo.get(str(file.resolve()))
        if cached is None or cached["stamp"] != stamp:
            cached = {"stamp": stamp, "sha256": file_sha256(file)}
            memo[str(file.resolve())] = cached
        total.update(f"{file.relative_to(path)}\0{cached['sha256']}\n".encode())
    if memo_file is not None:
        _save_memo(memo_file, memo)
    return total.hexdigest()[:24]


def file_digest(path: Path, memo_file: Path) -> str:
    """sha256 of one file, memoised by (size, mtime) like `directory_digest`."""
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cached = memo.get(str(path.resolve()))
    if cached is not None and cached["stamp"] == stamp:
        return cached["sha256"]
    digest = file_sha256(path)
    memo[str(path.resolve())] = {"stamp": stamp, "sha256": digest}
    _save_memo(memo_file, memo)
    return digest


def _save_memo(memo_file: Path, memo: dict) -> None:
    write_atomically(memo_file, json.dumps(memo))


def file_sha256(path: Path) -> str:
    """The one file digest: stage keys, model directories, manifests, the shipped tiny model."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
