"""`manifest.json` for every bundle: who produced it (library versions, CUDA, driver, GPU), what it
is for (target GPU and compute capability, TensorRT-LLM version, tp/pp), how it was made
(quantization block, build config, command lines), and the sha256 of every file. `verify` checks
the files against it and says whether this machine can load the bundle, and why not.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmopt.cache import file_sha256, write_atomically

MANIFEST = "manifest.json"
# the stage cache's own record of the output, written after the bundle: not part of it
NOT_BUNDLED = {MANIFEST, "artifact.json"}
SCHEMA = 1
PRODUCERS = ("llmopt", "torch", "transformers", "nvidia-modelopt", "tensorrt_llm", "tensorrt", "safetensors")


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the manifest (and the cache's record), by path relative to `root`."""
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in NOT_BUNDLED}


def compare_digests(listed: dict[str, str], root: Path) -> list[str]:
    """Files under `root` that differ from, are missing from, or are not in `listed` (name -> sha256)."""
    present = file_digests(root)
    problems = []
    for name, digest in sorted(listed.items()):
        if name not in present:
            problems.append(f"{name}: listed in the manifest but missing")
        elif present[name] != digest:
            problems.append(f"{name}: sha256 does not match the manifest ({present[name][:12]}... against {digest[:12]}...)")
    problems += [f"{name}: not in the manifest (added after it was written)" for name in sorted(set(present) - set(listed))]
    return problems


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where the file system allows (no second copy of the weights), else a copy."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.hardlink_to(src)
    except OSError:
        shutil.copy2(src, dest)


def producer_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PRODUCERS:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    """This machine's GPU, compute capability, CUDA and driver (None where there is no GPU)."""
    import torch
    from llmopt.eval import nvml

    info: dict = {"python": platform.python_version(), "cuda": torch.version.cuda, "driver": nvml.driver_version(),
                  "gpu": None, "compute_capability": None, "gpu_count": 0}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(gpu=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}",
                    gpu_count=torch.cuda.device_count())
    return info


def write(root: Path, body: dict) -> dict:
    """Checksum every file and write the manifest last (atomically)."""
    manifest = {"schema": SCHEMA, **body, "producer": {"versions": producer_versions(), "machine": machine()},
                "files": file_digests(root)}
    write_atomically(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


@dataclass
class Report:
    structure: list[str] = field(default_factory=list)  # what is wrong with the bundle itself
    environment: list[str] = field(default_factory=list)  # why this machine cannot load it
    files: int = 0


def verify(root: Path) -> Report:
    """Checksums and schemas (the bundle), then versions, compute capability and GPU count (this machine)."""
    from llmopt.export import checkpoint, support, trtllm

    report = Report()
    path = root / MANIFEST
    if not path.is_file():
        report.structure.append(f"{path} is missing: not an llmopt bundle")
        return report
    try:
        manifest = checkpoint.read_json(path)
    except checkpoint.Unreadable as e:
        report.structure.append(f"{e}: the bundle cannot be checked against it")
        return report
    listed = manifest.get("files", {})
    report.files = len(listed)
    report.structure += compare_digests(listed, root)
    if (root / trtllm.TRTLLM_CHECKPOINT).is_dir():
        report.structure += checkpoint.check_trtllm_checkpoint(root / trtllm.TRTLLM_CHECKPOINT)
    if (root / trtllm.CHECKPOINT).is_dir():
        report.structure += checkpoint.check_hf_checkpoint(root / trtllm.CHECKPOINT)

    target = manifest.get("target", {})
    here = machine()
    world = target.get("tp", 1) * target.get("pp", 1)
    if here["gpu_count"] < world:
        report.environment.append(f"needs {world} GPU(s) (tp {target.get('tp', 1)} x pp {target.get('pp', 1)}), "
                                  f"this machine has {here['gpu_count']}")
    if here["compute_capability"] is not None:
        major, minor = (int(x) for x in here["compute_capability"].split("."))
        verdict = support.check(target["format"], target["route"], major * 10 + minor, target["trtllm_version"])
        if not verdict.ok:
            report.environment.append(f"this GPU ({here['gpu']}): {verdict.reason}")
        if target["route"] == "trtllm-engine" and (root / trtllm.ENGINE).is_dir() and \
                here["compute_capability"] != target.get("compute_capability"):
            report.environment.append(f"engines run on the compute capability they were built for "
                                      f"({target.get('compute_capability')}), this GPU is {here['compute_capability']}")
    try:
        local = version("tensorrt_llm")
    except PackageNotFoundError:
        local = None
    if local is None:
        report.environment.append("tensorrt_llm is not installed here")
    elif target["route"] == "trtllm-engine" and (root / trtllm.ENGINE).is_dir() and local != manifest.get("build", {}).get(
            "tensorrt_llm"):
        report.environment.append(f"engines load with the TensorRT-LLM version that built them "
                                  f"({manifest.get('build', {}).get('tensorrt_llm')}), this machine has {local}")
    return report
