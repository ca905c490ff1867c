"""What is installed: the versions of llmopt's libraries, recorded on every run and part of the keys
of what a stage computes (its cache entry, the teacher's precomputed top-k logits), and the whole
environment's lock list."""

from __future__ import annotations

from importlib import metadata

TRACKED_LIBRARIES = ("llmopt", "torch", "transformers", "accelerate", "bitsandbytes", "gptqmodel", "optimum", "modelopt",
                     "mlflow")
DISTRIBUTIONS = {"modelopt": "nvidia-modelopt"}  # import name -> distribution name, where they differ


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment_lock() -> str:
    """`pip freeze`-style list of every installed distribution (names and versions only)."""
    dists = {(d.metadata["Name"] or "?").lower(): d.version for d in metadata.distributions()}
    return "".join(f"{name}=={version}\n" for name, version in sorted(dists.items()))
