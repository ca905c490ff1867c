"""JIT-built extensions (llmopt.kernels.builds): where torch builds them during a run, and that a
build interrupted earlier cannot hang the next one. The loaders here are stand-ins for ModelOpt's
(which build only with CUDA); what is tested is the folder, the locks and the order of events."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from llmopt.kernels import builds


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(builds.ENV, raising=False)
    monkeypatch.setattr(builds, "_ours", None)


def test_runs_build_under_the_cache_root_unless_the_user_chose_a_folder(clean_env, monkeypatch, tmp_path):
    folder = builds.use_build_cache(tmp_path / "a")
    assert folder == (tmp_path / "a" / "torch-extensions" / "torch" / builds._tag()).resolve()
    assert builds.build_root() == folder and (folder / builds.OWNED).exists()
    # a later run in the same process (another cache root) moves llmopt's own setting
    assert builds.use_build_cache(tmp_path / "b") == builds.build_root() != folder
    # the user's own folder is kept, and is not llmopt's to clear
    monkeypatch.setenv(builds.ENV, str(tmp_path / "mine"))
    assert builds.use_build_cache(tmp_path / "c") is None
    assert builds.build_root() == tmp_path / "mine"


def test_a_dead_builds_lock_in_llmopts_folder_is_removed_before_building(clean_env, tmp_path, caplog):
    root = builds.use_build_cache(tmp_path)
    for name in ("ext_a", "other_ext"):
        (root / name).mkdir()
        (root / name / "lock").touch()  # what torch leaves when a build is killed
    seen = []
    with caplog.at_level(logging.WARNING, "llmopt"):
        seconds = builds.build({"ext_a": lambda: seen.append((root / "ext_a" / "lock").exists()) or "ext_a"},
                               "test extension")
    assert seen == [False], "the loader ran while the stale lock was still there (torch would wait forever)"
    assert (root / "other_ext" / "lock").exists(), "only the extensions being built are cleared"
    assert str(root / "ext_a" / "lock") in caplog.text and seconds >= 0


def test_a_lock_in_the_users_folder_is_reported_not_removed(clean_env, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(builds.ENV, str(tmp_path))
    (tmp_path / "ext_a").mkdir()
    (tmp_path / "ext_a" / "lock").touch()
    seen = []
    with caplog.at_level(logging.WARNING, "llmopt"):
        builds.build({"ext_a": lambda: seen.append(1) or "ext_a"}, "test extension")
    assert seen == [1] and (tmp_path / "ext_a" / "lock").exists()
    assert str(tmp_path / "ext_a" / "lock") in caplog.text and "interrupted" in caplog.text


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_build_waits_for_another_llmopt_build_in_the_same_folder(clean_env, tmp_path, caplog):
    """A live build elsewhere holds the flock: this one neither removes its torch lock nor loads
    until it is done."""
    root = builds.use_build_cache(tmp_path)
    (root / "ext_a").mkdir()
    done = tmp_path / "other-build-done"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(root / builds.FLOCK)!r}, os.O_CREAT | os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(root / 'ext_a' / 'lock')!r}, 'w').close()\n"  # its build in progress
        "print('held', flush=True)\n"
        "time.sleep(1.5)\n"
        f"os.remove({str(root / 'ext_a' / 'lock')!r})\n"
        f"open({str(done)!r}, 'w').close()\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        seen = []
        with caplog.at_level(logging.INFO, "llmopt"):
            builds.build({"ext_a": lambda: seen.append(done.exists()) or "ext_a"}, "test extension")
    finally:
        holder.wait(timeout=30)
    assert seen == [True], "loaded before the other build finished"
    assert "waiting for another llmopt process" in caplog.text and "removing" not in caplog.text


@pytest.mark.parametrize("failure", ["raises", "returns nothing"])
def test_a_failed_build_names_the_extension_and_its_log(clean_env, tmp_path, failure):
    """A build that fails (a compiler error, or ModelOpt's loader giving nothing back) stops the run on
    one line naming the extension and a log holding the whole error: not a slower path later."""
    from llmopt.kernels import KernelBuildError

    root = builds.use_build_cache(tmp_path)

    def broken():
        if failure == "raises":
            raise RuntimeError("Error building extension 'ext_b':\nnvcc fatal   : Unsupported gpu architecture 'compute_120'")

    with pytest.raises(KernelBuildError) as failed:
        builds.build({"ext_a": lambda: "ext_a", "ext_b": broken}, "test extension")
    message = str(failed.value)
    assert message.startswith("test extension: ext_b failed to build (") and "\n" not in message
    log = Path(message.rpartition("build log: ")[2])
    assert log == root / "ext_b-build.log"
    assert ("Unsupported gpu architecture 'compute_120'" in log.read_text()) == (failure == "raises")


@pytest.mark.parametrize(("fmt", "kv_cache", "expected"), [
    ("int4_awq", None, ["modelopt_cuda_ext"]),
    ("int4_awq", "fp8", ["modelopt_cuda_ext", "modelopt_cuda_ext_fp8"]),
    ("fp8", None, ["modelopt_cuda_ext", "modelopt_cuda_ext_fp8"]),
    ("int8_sq", None, ["modelopt_cuda_ext"]),
])
def test_modelopt_builds_the_extensions_its_format_runs(monkeypatch, fmt, kv_cache, expected):
    """With CUDA, the quantize stage builds ModelOpt's extensions through `builds.build` (the safe
    path) before calibrating: the FP8 one only for formats with FP8 quantizers. Without CUDA ModelOpt
    quantizes in plain torch, and nothing is built."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    from llmopt.export import modelopt
    from modelopt.torch.quantization import extensions

    asked, called = [], []
    for name in ("get_cuda_ext", "get_cuda_ext_fp8"):
        monkeypatch.setattr(extensions, name, lambda name=name, **kw: called.append((name, kw)) or name)

    def build(loaders, what):
        asked.append([load() for load in loaders.values()])
        asked.append(list(loaders))
        return 1.5

    monkeypatch.setattr(builds, "build", build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modelopt.build_extensions(fmt, kv_cache) == 0.0 and asked == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert modelopt.build_extensions(fmt, kv_cache) == 1.5 and asked[1] == expected
    # ModelOpt is asked to raise on a failed build (it would otherwise warn and fail far from the cause)
    assert [kw for _, kw in called] == [{"raise_if_failed": True}] * len(expected)
    assert [name for name, _ in called] == [n.replace("modelopt_cuda_ext", "get_cuda_ext") for n in expected]
