"""`kernel: machete` (llmopt.kernels.machete): what llmopt generates and how it compiles it. No GPU
here: the generator runs for real (GPTQModel's, on the nvidia-cutlass wheel's CUTLASS), the compiler
is a stand-in that records its command lines (these tests check llmopt's commands, never that the
library works: that is the GPU test's and `benchmarks/machete_probe.py`'s)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import torch
from llmopt import kernels
from llmopt.kernels import machete
from llmopt.kernels.linear import MacheteLinear, QuantizedWeight

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_the_generator_writes_machete_for_bf16_on_symmetric_4bit_codes_only(tmp_path):
    root = machete.cutlass_checkout(tmp_path)
    assert (root / "include" / "cutlass" / "cutlass.h").is_file() and (root / "python" / "cutlass_library").is_dir()
    sources = machete.generate(tmp_path / "gen", root)
    names = {p.name for p in sources}
    assert "machete_mm_dispatch.cu" in names and "machete_prepack.cu" in names
    text = "\n".join(p.read_text() for p in sources)
    kernels_written = set(re.findall(r"impl_(\w+?)_sch_(\w+?)\(", text))
    types = {t for t, _ in kernels_written}
    assert types == {"bf16u4b8bf16voidvoidvoidbf16f32"}, types
    shapes = {s.split("_")[0] for _, s in kernels_written}
    # every tile shape the heuristic picks from, decode (128x16) to prefill (128x256)
    assert {"128x16", "128x32", "128x64", "128x128", "128x256", "256x128"} <= shapes, shapes
    assert "f16u4b8" not in text.replace("bf16u4b8", "") and "u8b128" not in text.split("prepack")[0]


def _stand_in_toolkit(tmp_path: Path, fail_on: str | None = None) -> tuple[Path, Path]:
    """A CUDA_HOME whose nvcc records each command line and writes its -o file (or fails on the
    source named `fail_on`), with the library headers torch's ATen/cuda includes; and a torch folder
    of 2.11's kind (c++17)."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    for header in machete.CUDA_HEADERS:
        (home / "include" / header).write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path / "calls"}
for a in "$@"; do case "$a" in *{fail_on or "NEVER"}*) echo "error: no" >&2; exit 1;; esac; done
while [ $# -gt 0 ]; do if [ "$1" = "-o" ]; then echo built > "$2"; fi; shift; done
""")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    torch_dir = tmp_path / "torch"
    (torch_dir / "utils").mkdir(parents=True)
    (torch_dir / "lib").mkdir()
    (torch_dir / "include").mkdir()
    (torch_dir / "utils" / "cpp_extension.py").write_text("    common_cflags += ['-std=c++17', '-fPIC']\n")
    (torch_dir / "version.py").write_text("__version__ = '2.11.0+cu130'\n")
    return home, torch_dir


def test_each_source_compiles_for_sm90a_against_the_named_torch_and_links_once(tmp_path, monkeypatch):
    """Stand-in compiler: llmopt's command lines and its cache, not a working library."""
    home, torch_dir = _stand_in_toolkit(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    library = machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    calls = (tmp_path / "calls").read_text().splitlines()
    compiles, links = [c for c in calls if " -c " in f" {c} "], [c for c in calls if "-shared" in c]
    sources = sorted((tmp_path / "out" / "generated").glob("*.cu"))
    assert len(compiles) == len(sources) + 1 and len(links) == 1  # + machete_pytorch.cu, GPTQModel's op registration
    for call in compiles:
        assert "-gencode=arch=compute_90a,code=sm_90a" in call and "-std=c++17" in call
        assert f"-I{torch_dir / 'include'}" in call and f"-I{home / 'include'}" in call
    assert "machete_pytorch.cu" in " ".join(compiles)
    assert f"-L{torch_dir / 'lib'}" in links[0] and "-ltorch_cuda" in links[0] and str(library) in links[0]
    assert library.read_text() == "built\n"
    # the same key: nothing compiled again; another torch: everything
    machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    assert len((tmp_path / "calls").read_text().splitlines()) == len(calls)
    (torch_dir / "version.py").write_text("__version__ = '2.12.0+cu130'\n")
    machete.build_library(tmp_path / "out", torch_dir, jobs=2, log=lambda _: None)
    assert len((tmp_path / "calls").read_text().splitlines()) == 2 * len(calls)


def test_a_failed_compile_is_one_line_naming_the_kernel_and_the_source_log(tmp_path, monkeypatch):
    home, _ = _stand_in_toolkit(tmp_path, fail_on="machete_prepack.cu")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.delenv(machete.LIBRARY_ENV, raising=False)
    with pytest.raises(kernels.KernelBuildError) as failed:
        machete.build_machete(tmp_path / "cache")
    message = str(failed.value)
    assert message.startswith("kernel machete failed to build or load") and "\n" not in message
    assert "nvcc failed on machete_prepack.cu" in message and "machete_prepack.log" in message
    assert not list((tmp_path / "cache").rglob(machete.LIBRARY_NAME)), "no library left from a failed build"


def test_a_named_library_that_is_missing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(machete.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(kernels.KernelBuildError, match=r"LLMOPT_MACHETE_LIBRARY=.*nope.so is not a file"):
        machete.build_machete(tmp_path)


def test_the_header_search_names_what_it_misses(tmp_path, monkeypatch):
    home = tmp_path / "cuda"
    (home / "include").mkdir(parents=True)
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.setattr(machete, "_wheel_header_dirs", lambda: [])
    with pytest.raises(RuntimeError, match="needs the CUDA headers cusparse.h, cublas_v2.h, cublasLt.h, cusolverDn.h"):
        machete.header_dirs([])
    assert machete.header_dirs([_headers(tmp_path / "extra")])[-1] == tmp_path / "extra"


def _headers(folder: Path) -> Path:
    folder.mkdir()
    for header in machete.CUDA_HEADERS:
        (folder / header).write_text("")
    return folder


@pytest.mark.parametrize("bits, group, act_order, shape, words", [
    (8, 128, False, (256, 256), "machete runs symmetric 4-bit weights"),
    (4, 32, False, (256, 256), "machete takes groups of 64 or 128 or one per row, not 32"),
    (4, 128, True, (256, 256), "machete runs weights without act-order"),
    (4, 64, False, (192, 256), "machete needs inputs in multiples of 64 and outputs of 128, not a 192x256 layer"),
])
def test_machete_refuses_what_it_cannot_run_before_touching_gptqmodel(bits, group, act_order, shape, words):
    """A ValueError: `auto`'s signal to take the next kernel, and the named kernel's message."""
    n, k = shape
    g_idx = torch.randperm(k) // group if act_order else None
    weight = QuantizedWeight(codes=torch.zeros(n, k, dtype=torch.uint8), scales=torch.ones(k // group, n),
                             bits=bits, group_size=group, g_idx=g_idx)
    with pytest.raises(ValueError, match=re.escape(words)):
        MacheteLinear(weight, "cpu", torch.bfloat16)


def test_gptq_grids_list_machete_where_it_runs():
    from llmopt.methods.gptq import gptq_kernels

    assert gptq_kernels({"bits": 4, "group_size": 128}, "cuda") == ("marlin", "machete", "int4pack")
    assert "machete" not in gptq_kernels({"bits": 8, "group_size": 128}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 32}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128, "desc_act": True}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128, "sym": False}, "cuda")
    assert "machete" not in gptq_kernels({"bits": 4, "group_size": 128}, "cpu")
    assert kernels.usable(("marlin", "machete"), "cuda", 90) == ("marlin", "machete")
    # auto never builds or tries it, not even where Marlin refuses a model's shapes: int4pack comes next
    assert kernels.auto_order(("marlin", "machete", "int4pack")) == ("marlin", "int4pack")
    assert kernels.usable(("marlin", "machete"), "cuda", 100) == ("marlin",)
