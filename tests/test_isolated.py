"""llmopt.isolated: third-party work (GPTQModel's quantization) in a child process of its own, so
that what it leaves behind (worker threads with OpenMP teams of their own, which slowed the
benchmark stage's torch ops 2.9-3.2x in the process they ran in) stays out of the pipeline's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmopt.isolated import run_isolated


def test_a_call_returns_its_value_raises_its_exception_and_names_a_death():
    assert run_isolated(pow, 3, 5, label="pow") == 243
    assert run_isolated(os.getpid, label="pid") != os.getpid(), "another process"
    with pytest.raises(ValueError, match="invalid literal for int"):  # the child's exception, type and message
        run_isolated(int, "not a number", label="int")
    with pytest.raises(RuntimeError, match="^exit: its process exited with code 3 before it finished$"):
        run_isolated(os._exit, 3, label="exit")


def test_gptqmodel_quantizes_in_a_child_and_leaves_no_thread_behind(tiny_model, tmp_path):
    """GPTQModel's RTN on the tiny model, from a fresh process (this one may hold GPTQModel's threads
    from loading a checkpoint): the checkpoint is written, and that process has the same threads
    after as before (in-process, GPTQModel's DPWorker threads stayed: 9 of them); loading the
    checkpoint there keeps GPTQModel's banner and INFO lines off the terminal."""
    code = (
        "import json, sys, threading\n"
        "from pathlib import Path\n"
        "from llmopt.cache import Artifact\n"
        "from llmopt.methods.gptq_rtn import GptqRtnQuantize\n"
        "from llmopt.stages import StageContext, quantize\n"
        "before = sorted(t.name for t in threading.enumerate())\n"
        "out = Path(sys.argv[2])\n"
        "artifact = quantize.run(GptqRtnQuantize(stage='quantize', method='gptq_rtn', bits=4, group_size=32),\n"
        "                        Artifact(Path(sys.argv[1]), 'hf-checkpoint'), out,\n"
        "                        StageContext('cpu', 'float32', False, progress=False))\n"
        "after = sorted(t.name for t in threading.enumerate())\n"
        "from llmopt.models import load_model\n"
        "load_model(artifact, 'cpu', 'float32')\n"
        "print(json.dumps({'before': before, 'after': after,\n"
        "                  'format': artifact.info['format'], 'ratio': artifact.metrics['memory/compression_ratio']}))\n")
    out = tmp_path / "q"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model), str(out)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out / "model.safetensors").is_file() and found["format"] == "gptq" and found["ratio"] > 3
    assert found["after"] == found["before"] == ["MainThread"]
    # loading it is this process's first GPTQModel import: no banner, no INFO lines on the terminal
    said = done.stdout + done.stderr
    assert "GPT-QModel" not in said and "Kernel: selected" not in said, said[-2000:]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_the_child_dies_with_a_killed_pipeline():
    """kill -9 of the process that waits on an isolated call: its child does not run on."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; from llmopt.isolated import run_isolated; "
                               "run_isolated(time.sleep, 600, label='sleep')"])
    try:
        deadline, children = time.monotonic() + 60, []
        while not children and time.monotonic() < deadline:
            children = [c for c in _children(parent.pid)
                        if "llmopt.isolated" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
            time.sleep(0.1)
        (child,) = children
        assert _running(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the isolated child outlived the killed pipeline"
    finally:
        parent.kill()
