"""Run a function in a child process of its own (a fresh interpreter: `python -m llmopt.isolated`)
and return its result.

For third-party work that leaves state behind in the process that ran it. Measured on this
project's 2-core machine (2026-12-06): after GPTQModel quantized in the pipeline's own process,
its worker threads stayed (9 of them, idle), each having run torch ops with an OpenMP team of its
own; libgomp, then managing more threads than there are cores, stops spinning between parallel
regions, and the tiny base decoded at batch 4 in 11.0 and 13.8 ms a step in that process where it
had taken 3.8 and 4.4 before (the main thread waiting, not computing: 8.0 and 9.8 ms of its CPU
time). With the quantization in a child: 5.7 and 6.7 ms, as in a process that quantized nothing
(4.6-6.8). A benchmark stage after a cold quantize runs in that process: its figures were lost there.

A plain child (not multiprocessing's spawn), so that nothing re-imports the caller's `__main__`: a
user's script without a `__main__` guard works. The call and its result travel as pickles through
a private temporary folder: llmopt's own objects, written and read by llmopt (weights never travel
this way). The child shares the terminal (progress bars) and dies with the pipeline
(PR_SET_PDEATHSIG), so a killed run leaves nothing writing into the stage's folder that the next
run resumes; Ctrl-C reaches it as it reaches the pipeline (one process group). An exception in the
child is raised in the parent with its type and message (a RuntimeError naming the type where it
cannot be pickled); a child that dies (killed, out of memory) is a RuntimeError naming `label`.
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CALL, RESULT = "call.pickle", "result.pickle"


def run_isolated(fn: Callable[..., Any], *args: Any, label: str) -> Any:
    """`fn(*args)` in a child process; `fn` must be importable by its module path (module level)."""
    with tempfile.TemporaryDirectory(prefix="llmopt-isolated-") as tmp:
        folder = Path(tmp)
        (folder / CALL).write_bytes(pickle.dumps((fn, args)))
        code = subprocess.run([sys.executable, "-m", "llmopt.isolated", str(folder)], stdin=subprocess.DEVNULL,
                              preexec_fn=die_with_parent).returncode
        if not (folder / RESULT).is_file():
            raise RuntimeError(f"{label}: its process exited with code {code} before it finished"
                               f"{' (killed, or out of memory)' if code < 0 or code == 137 else ''}")
        ok, value = pickle.loads((folder / RESULT).read_bytes())  # written by the child above, in this private folder
    if not ok:
        raise value
    return value


def _call(fn: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    try:
        return True, fn(*args)
    except Exception as e:  # returned, not hidden: raised again in the parent
        try:
            pickle.loads(pickle.dumps(e))
        except Exception:
            return False, RuntimeError(f"{type(e).__name__}: {e}")
        return False, e


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Linux: `sig` to this process when its parent (the pipeline's process) exits, even by SIGKILL.
    Called in a child before it runs (a `preexec_fn`, or first thing in its main): every process
    llmopt starts (isolated calls, servers, the load generator, distillation's workers) uses it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # 1 = PR_SET_PDEATHSIG


def main(folder: Path) -> None:
    fn, args = pickle.loads((folder / CALL).read_bytes())  # written by run_isolated in its private folder
    result = _call(fn, args)
    (folder / (RESULT + ".tmp")).write_bytes(pickle.dumps(result))
    (folder / (RESULT + ".tmp")).rename(folder / RESULT)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
