"""TensorRT-LLM bundles: the files, the serving options, the exact command lines, and the launcher
that runs them where TensorRT-LLM exists (a local installation or a container image).

Nothing here imports TensorRT-LLM: every command runs through the launcher, and when the launcher
cannot reach TensorRT-LLM the bundle is still written, with the reason recorded.

Command-line flags, as documented (read 2026-11):
- trtllm-build: https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html
- trtllm-serve: https://nvidia.github.io/TensorRT-LLM/commands/trtllm-serve/trtllm-serve.html
- trtllm-bench: https://nvidia.github.io/TensorRT-LLM/commands/trtllm-bench.html
- extra_llm_api_options YAML (LLM API arguments: max_batch_size, max_num_tokens, max_seq_len,
  tensor/pipeline_parallel_size, kv_cache_config, cuda_graph_config):
  https://nvidia.github.io/TensorRT-LLM/llm-api/reference.html
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from llmopt.export.manifest import link_or_copy

# the flags each command documents that llmopt uses (tests check every emitted flag against these)
DOCUMENTED_FLAGS = {
    "trtllm-build": {"--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_input_len", "--max_seq_len",
                     "--max_num_tokens", "--kv_cache_type", "--gemm_plugin", "--workers"},
    "trtllm-serve": {"--host", "--port", "--backend", "--tp_size", "--pp_size", "--max_batch_size", "--max_num_tokens",
                     "--max_seq_len", "--kv_cache_free_gpu_memory_fraction", "--extra_llm_api_options", "--tokenizer"},
    "trtllm-bench": {"--model", "--model_path", "throughput", "prepare-dataset", "--dataset", "--backend",
                     "--engine_dir", "--tp", "--pp", "--max_batch_size", "--max_num_tokens",
                     "--kv_cache_free_gpu_mem_fraction", "--extra_llm_api_options", "--output", "token-norm-dist",
                     "--num-requests", "--input-mean", "--output-mean", "--input-stdev", "--output-stdev"},
}

CHECKPOINT = "checkpoint"  # the HF-format checkpoint (PyTorch backend)
TRTLLM_CHECKPOINT = "trtllm-checkpoint"  # the TensorRT-LLM checkpoint (engine route)
TOKENIZER = "tokenizer"  # the engine route's tokenizer and model config (the engine holds the weights)
ENGINE = "engine"
OPTIONS_FILE = "extra_llm_api_options.yaml"
COMMANDS_FILE = "commands.sh"
# files of an HF checkpoint directory that belong in a bundle (the rest, e.g. fake-quant state, does not)
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "chat_template*")
HF_FILES = (*TOKENIZER_FILES, "*.safetensors", "*.safetensors.index.json", "hf_quant_config.json")


@dataclass(frozen=True)
class Loadable:
    """What the LLM API loads from a bundle (or from an HF checkpoint, such as the base model)."""

    model: Path  # LLM(model=...)
    tokenizer: Path | None  # LLM(tokenizer=...): the engine route's tokenizer folder; None: the model's own
    config: Path  # the folder holding the HF config.json (architecture, vocabulary, context)
    weights: tuple[Path, ...]  # the files that hold the weights (their size is the weights' size)


def loadable(path: Path) -> Loadable:
    """A `trtllm` bundle's checkpoint/, a built `trtllm-engine` bundle's engine/ with tokenizer/, or an
    HF checkpoint directory; ValueError for an engine bundle that was never built, or anything else."""
    if (path / ENGINE).is_dir():
        return Loadable(path / ENGINE, path / TOKENIZER, path / TOKENIZER, tuple(sorted((path / ENGINE).glob("*.engine"))))
    if (path / CHECKPOINT).is_dir():
        return Loadable(path / CHECKPOINT, None, path / CHECKPOINT, tuple(sorted((path / CHECKPOINT).glob("*.safetensors"))))
    if (path / TRTLLM_CHECKPOINT).is_dir():
        raise ValueError(f"{path}: a trtllm-engine bundle without {ENGINE}/: trtllm-build did not run here (manifest.json "
                         f"build.reason says why); build it with commands.sh where TensorRT-LLM is installed")
    if (path / "config.json").is_file():
        return Loadable(path, None, path, tuple(sorted(path.glob("*.safetensors"))))
    raise ValueError(f"{path}: neither a TensorRT-LLM bundle ({CHECKPOINT}/ or {ENGINE}/) nor an HF checkpoint (config.json)")


def copy_checkpoint(src: Path, dest: Path, patterns: tuple[str, ...] = HF_FILES) -> list[str]:
    """The HF checkpoint's serving files (hard links where the file system allows: no second copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in patterns:
        for f in sorted(src.glob(pattern)):
            if f.is_file() and not (dest / f.name).exists():
                link_or_copy(f, dest / f.name)
                copied.append(f.name)
    return copied


def llm_api_options(cfg, kv_cache_dtype: str | None) -> dict:
    """The PyTorch backend's serving options (`--extra_llm_api_options`)."""
    kv = {"free_gpu_memory_fraction": cfg.kv_cache_free_gpu_memory_fraction}
    if kv_cache_dtype:
        kv["dtype"] = kv_cache_dtype
    return {"max_batch_size": cfg.max_batch_size, "max_num_tokens": cfg.max_num_tokens, "max_seq_len": cfg.max_seq_len,
            "tensor_parallel_size": cfg.tp, "pipeline_parallel_size": cfg.pp, "kv_cache_config": kv,
            "cuda_graph_config": {"batch_sizes": cfg.cuda_graph_batch_sizes, "enable_padding": True}}


def build_command(cfg, checkpoint: str, output: str) -> list[str]:
    """trtllm-build over a TensorRT-LLM checkpoint (tp/pp come from the checkpoint's mapping)."""
    return ["trtllm-build", "--checkpoint_dir", checkpoint, "--output_dir", output,
            "--max_batch_size", str(cfg.max_batch_size), "--max_input_len", str(cfg.max_input_len),
            "--max_seq_len", str(cfg.max_seq_len), "--max_num_tokens", str(cfg.max_num_tokens),
            "--kv_cache_type", "paged", "--gemm_plugin", cfg.gemm_plugin, "--workers", str(cfg.tp * cfg.pp)]


def serve_command(cfg, model: str, tokenizer: str = TOKENIZER) -> list[str]:
    command = ["trtllm-serve", model, "--host", "0.0.0.0", "--port", "8000"]
    if cfg.target == "trtllm":
        command += ["--backend", "pytorch", "--tp_size", str(cfg.tp), "--pp_size", str(cfg.pp),
                    "--max_batch_size", str(cfg.max_batch_size), "--max_num_tokens", str(cfg.max_num_tokens),
                    "--max_seq_len", str(cfg.max_seq_len),
                    "--kv_cache_free_gpu_memory_fraction", str(cfg.kv_cache_free_gpu_memory_fraction),
                    "--extra_llm_api_options", OPTIONS_FILE]
    else:
        command += ["--backend", "tensorrt", "--tokenizer", tokenizer]
    return command


def bench_commands(cfg, model_name: str, input_tokens: int = 128, output_tokens: int = 256,
                   requests: int = 512) -> list[list[str]]:
    """Dataset preparation, then a throughput run on the bundle."""
    components = CHECKPOINT if cfg.target == "trtllm" else TOKENIZER  # tokenizer and config
    prepare = ["trtllm-bench", "--model", model_name, "--model_path", components, "prepare-dataset",
               "--output", "dataset.jsonl", "token-norm-dist", "--num-requests", str(requests),
               "--input-mean", str(input_tokens), "--output-mean", str(output_tokens),
               "--input-stdev", "0", "--output-stdev", "0"]
    run = ["trtllm-bench", "--model", model_name, "--model_path", components, "throughput", "--dataset", "dataset.jsonl",
           "--max_batch_size", str(cfg.max_batch_size), "--max_num_tokens", str(cfg.max_num_tokens)]
    if cfg.target == "trtllm":
        run += ["--backend", "pytorch", "--tp", str(cfg.tp), "--pp", str(cfg.pp),
                "--kv_cache_free_gpu_mem_fraction", str(cfg.kv_cache_free_gpu_memory_fraction),
                "--extra_llm_api_options", OPTIONS_FILE]
    else:
        run += ["--backend", "tensorrt", "--engine_dir", ENGINE]
    return [prepare, run]


SMOKE_SCRIPT = """\
import json, sys
from tensorrt_llm import LLM, SamplingParams
import tensorrt_llm
model, tokenizer, prompt, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
kwargs = {"tokenizer": tokenizer} if tokenizer != "-" else {}
llm = LLM(model=model, **kwargs)
out = llm.generate([prompt], SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
print("LLMOPT_SMOKE " + json.dumps({"text": out[0].outputs[0].text, "tokens": len(out[0].outputs[0].token_ids),
                                    "tensorrt_llm": tensorrt_llm.__version__}))
"""


def smoke_command(cfg, model: str, tokenizer: str | None) -> list[str]:
    """Load the bundle with the LLM API and generate a few tokens."""
    return ["python3", "smoke.py", model, tokenizer or "-", cfg.smoke_prompt, str(cfg.smoke_tokens)]


def shell_line(command: list[str]) -> str:
    return shlex.join(command)


# --- launcher -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reach:
    ok: bool
    reason: str  # why TensorRT-LLM cannot be reached, or how it is
    version: str | None = None


class Launcher:
    """Runs TensorRT-LLM's commands in the bundle directory, locally or in a container."""

    def __init__(self, spec):
        self.spec = spec

    def _local(self, name: str) -> str | None:
        if self.spec.bin_dir is not None:
            candidate = Path(self.spec.bin_dir) / name
            return str(candidate) if candidate.is_file() else None
        return shutil.which(name)

    def wrap(self, command: list[str], workdir: Path) -> list[str]:
        if self.spec.kind == "container":
            return [self.spec.cli, "run", "--rm", "--gpus", "all", "--ipc", "host", "-v", f"{workdir.resolve()}:/bundle",
                    "-w", "/bundle", self.spec.image, *command]
        return [self._local(command[0]) or command[0], *command[1:]]

    def reach(self, needs: str) -> Reach:
        """Whether `needs` (trtllm-build, or python3 with tensorrt_llm) can run, and the version."""
        if self.spec.kind == "container":
            if shutil.which(self.spec.cli) is None:
                return Reach(False, f"{self.spec.cli} is not installed on this machine (launcher kind: container)")
            probe = subprocess.run([self.spec.cli, "image", "inspect", self.spec.image], capture_output=True, text=True)
            if probe.returncode != 0:
                said = (probe.stderr.strip().splitlines() or ["no output"])[-1]
                return Reach(False, f"container image {self.spec.image} is not usable here ({self.spec.cli}: {said}); "
                                    f"{self.spec.cli} pull it first")
        elif self._local(needs) is None:
            where = f"in {self.spec.bin_dir}" if self.spec.bin_dir else "on PATH"
            return Reach(False, f"{needs} is not {where}: TensorRT-LLM is not installed here")
        version = self.run(["python3", "-c", "import tensorrt_llm; print(tensorrt_llm.__version__)"], Path.cwd(),
                           timeout=600)
        if version.returncode != 0:
            tail = (version.stdout + version.stderr).strip().splitlines()[-1:] or ["no output"]
            return Reach(False, f"tensorrt_llm does not import through the launcher: {tail[0]}")
        return Reach(True, "reachable", version.stdout.strip().splitlines()[-1])

    def run(self, command: list[str], workdir: Path, log: Path | None = None, timeout: float | None = None):
        result = subprocess.run(self.wrap(command, workdir), cwd=workdir, capture_output=True, text=True, timeout=timeout)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(f"$ {shell_line(command)}\n{result.stdout}{result.stderr}[exit {result.returncode}]\n")
        return result
