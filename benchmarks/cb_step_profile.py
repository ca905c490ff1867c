"""Probe (GPU, not a test): where does a continuous-batching step of transformers spend its ~20 ms?

benchmarks/cb_mask_probe.py measured, on an H200 with a random bf16 7B and small buffers, ~20 ms a
decoding step at 1 and 8 requests (33 ms at 32), where the static compiled loop needs ~5 ms. This
script runs `generate_batch` (CUDA graphs, small buffers, no async) on 8 requests of 128 in / 128
out and reports:
- the step time without CUDA graphs, with them, and with a 0.1 ms GIL switch interval;
- a wall-clock profile of every thread (yappi), the 40 functions with the most own time;
- the CUDA kernels' total time per step (torch profiler), against the step's wall time.

    python benchmarks/cb_step_profile.py OUTDIR     (yappi: in the wheels of benchmarks/device_serve_prepare.sh)
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import torch
from cb_mask_probe import random_7b_and_prompts
from transformers import ContinuousBatchingConfig

SMALL = dict(use_cuda_graph=True, use_async_batching=False, kv_padding_interval_size=2048, q_padding_interval_size=16,
             num_blocks=128, max_batch_tokens=512)
STEPS = 128


def timed(model, prompts, gen, options) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate_batch(prompts, generation_config=gen, continuous_batching_config=ContinuousBatchingConfig(**options))
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - started) / STEPS


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model, gen, prompts = random_7b_and_prompts(8, STEPS)
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "ms_per_step": {}}
    for name, options in {"eager": {**SMALL, "use_cuda_graph": False}, "graphs": SMALL}.items():
        timed(model, prompts, gen, options)
        report["ms_per_step"][name] = timed(model, prompts, gen, options)
        print(name, report["ms_per_step"][name], flush=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    report["ms_per_step"]["graphs-switch-0.1ms"] = timed(model, prompts, gen, SMALL)
    sys.setswitchinterval(interval)
    print(report["ms_per_step"], flush=True)

    import yappi

    yappi.set_clock_type("wall")
    yappi.start(builtins=True)
    report["ms_per_step"]["graphs-yappi"] = timed(model, prompts, gen, SMALL)
    yappi.stop()
    stats = yappi.get_func_stats()
    stats.sort("tsub", "desc")
    buf = io.StringIO()
    stats.print_all(out=buf, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 9), 3: ("ttot", 9), 4: ("tavg", 9)})
    (out / "yappi_tsub.txt").write_text("\n".join(buf.getvalue().splitlines()[:80]))
    stats.sort("ttot", "desc")
    buf = io.StringIO()
    stats.print_all(out=buf, columns={0: ("name", 90), 1: ("ncall", 10), 2: ("tsub", 9), 3: ("ttot", 9), 4: ("tavg", 9)})
    (out / "yappi_ttot.txt").write_text("\n".join(buf.getvalue().splitlines()[:120]))
    buf = io.StringIO()
    yappi.get_thread_stats().print_all(out=buf)
    (out / "yappi_threads.txt").write_text(buf.getvalue())
    yappi.clear_stats()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        report["ms_per_step"]["graphs-torch-profiler"] = timed(model, prompts, gen, SMALL)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
    (out / "torch_profile_cuda.txt").write_text(table)
    (out / "torch_profile_cpu.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    cuda_us = sum(e.self_device_time_total for e in prof.key_averages())
    report["cuda_ms_per_step"] = cuda_us / 1000 / STEPS
    print(json.dumps(report, indent=1), flush=True)
    (out / "cb_step_profile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
