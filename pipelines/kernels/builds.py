"""Extensions that libraries JIT-compile with torch's `cpp_extension.load` (ModelOpt's fake
quantization kernels): where they are cached, and building them so that an interrupted build
cannot hang the next run.

torch guards a build with a lock file in the extension's build folder (`FileBaton`) and waits for
it without a timeout or an owner check: a build killed part way (Ctrl-C during ModelOpt's first
calibration on a fresh GPU machine, which builds for minutes) leaves the file, and every later run
waits on it forever, showing nothing. Seen on the GPU machine on 2026-11-29.

So llmopt points torch's builds at a folder of its own under the cache root (unless the user set
`TORCH_EXTENSIONS_DIR`), and builds there holding an exclusive `flock` next to it: the kernel
releases that lock when its holder dies, and every llmopt build in the folder holds it, so a torch
lock file found while holding it was left by a dead build and is removed (GPTQModel does the same
for its own builds). In a folder the user chose, other programs may be building: a lock file there
is only reported, with its path.

Imports no torch at module level (validation imports `llmopt.kernels`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("llmopt")

ENV = "TORCH_EXTENSIONS_DIR"
OWNED = ".llmopt"  # marks a build folder llmopt made (and may clear dead builds' locks in)
FLOCK = ".build.flock"
_ours: str | None = None  # the value this process gave ENV, told apart from the user's


def _tag() -> str:
    """torch's own subfolder name for its default build root: builds for another Python or CUDA
    are not reused."""
    import torch

    if torch.version.hip is not None:
        device = f"rocm{torch.version.hip.replace('.', '')}"
    else:
        device = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}_{device}"


def use_build_cache(cache_root: Path) -> Path | None:
    """Send torch's JIT builds to `<cache root>/torch-extensions/torch/<py, CUDA>` (so a second run
    finds them built), unless the user set TORCH_EXTENSIONS_DIR. Returns the folder, or None when
    the user's is used."""
    global _ours
    from llmopt.kernels import BUILD_DIR

    current = os.environ.get(ENV)
    if current is not None and current != _ours:
        return None
    folder = Path(cache_root).resolve() / BUILD_DIR / "torch" / _tag()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNED).touch()
    os.environ[ENV] = _ours = str(folder)
    return folder


def build_root() -> Path:
    """Where torch builds now: TORCH_EXTENSIONS_DIR, else its default under the user's cache (as
    torch's `_get_build_directory` puts it)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ[ENV]) if os.environ.get(ENV) is not None else Path(get_default_build_root()) / _tag()


@contextlib.contextmanager
def _exclusive(path: Path, what: str):
    """An exclusive flock on `path`, said aloud when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, and so no stale-lock clearing either
        yield False
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another llmopt process building %s (lock %s)", what, path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def build(loaders: dict[str, Callable[[], object]], what: str, root: Path | None = None) -> float:
    """Run `loaders` (extension name -> a call that builds or loads it, in torch's build root)
    safely; seconds spent. In llmopt's own folder: under the flock, a torch lock file of these
    extensions is a dead build's and is removed. In another folder: reported. A loader that raises
    or returns nothing is a failed build: KernelBuildError naming the extension and the log written
    beside it (exit 1), never a slower path taken in silence."""
    from llmopt.kernels import KernelBuildError

    root = root or build_root()
    started = time.perf_counter()
    owned = (root / OWNED).exists()
    with _exclusive(root / FLOCK, what) if owned else contextlib.nullcontext(False) as locked:
        for name in loaders:
            lock = root / name / "lock"
            if lock.exists() and locked:
                log.warning("%s: removing %s, left by an interrupted build", what, lock)
                lock.unlink(missing_ok=True)
            elif lock.exists():
                log.warning("%s: %s exists; if no other process is building %s, a build was interrupted and left it: "
                            "delete it, or this run waits for it forever", what, lock, name)
        if owned and not all((root / name).is_dir() for name in loaders):
            log.info("building %s in %s (the first run on a machine compiles for minutes)", what, root)
        for name, load in loaders.items():
            try:
                loaded, detail = load(), "the loader returned nothing"
            except Exception as e:  # the build's own error (a compiler's output), kept in the log
                loaded, detail = None, f"{type(e).__name__}: {e}"
            if loaded is None:
                root.mkdir(parents=True, exist_ok=True)
                log_file = root / f"{name}-build.log"
                log_file.write_text(detail + "\n")
                first = " ".join(detail.split())[:200]
                raise KernelBuildError(f"{what}: {name} failed to build ({first}); build log: {log_file}")
    return time.perf_counter() - started
