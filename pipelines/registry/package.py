"""The registry package on disk: what a registered version's source holds, its content digest,
its manifest of sha256s, and a pulled download checked before it reaches its destination.

    MODEL_CARD.md     what was done, quality and performance tables, hardware, versions, serving
    manifest.json     sha256 of every file of the package (the card and model/ included)
    model/            the final artifact: a TensorRT-LLM bundle, or a checkpoint
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from llmopt.cache import replace_dir

PACKAGE_MANIFEST = "manifest.json"
CARD = "MODEL_CARD.md"
MODEL_DIR = "model"


def content_digest(path: Path) -> str:
    """sha256 over every file's name and sha256 (not the cache's record nor a bundle's manifest,
    which carry run-specific facts): the same weights and files give the same digest."""
    import hashlib

    from llmopt.export.manifest import file_digests

    return hashlib.sha256(json.dumps(file_digests(path), sort_keys=True).encode()).hexdigest()


def _link_tree(src: Path, dest: Path) -> None:
    from llmopt.export.manifest import link_or_copy

    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        link_or_copy(file, dest / file.relative_to(src))


def write_package(artifact: Path, card: str, dest: Path, body: dict) -> dict:
    """The registry package in `dest`: model/, the card, and a manifest of every file's sha256."""
    from llmopt.export.manifest import file_digests

    _link_tree(artifact, dest / MODEL_DIR)
    (dest / MODEL_DIR / "artifact.json").unlink(missing_ok=True)  # the stage cache's bookkeeping
    (dest / CARD).write_text(card)
    manifest = {"schema": 1, **body, "files": file_digests(dest)}
    (dest / PACKAGE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_package(root: Path) -> list[str]:
    """Files that differ from the package manifest (empty: intact)."""
    from llmopt.export.manifest import compare_digests

    path = root / PACKAGE_MANIFEST
    if not path.is_file():
        return [f"{PACKAGE_MANIFEST} is missing: not an llmopt package"]
    return compare_digests(json.loads(path.read_text()).get("files", {}), root)


# --- pulling: download into a staging folder, move only a verified package ------------------------------


def check_destination(dest: Path, overwrite: bool) -> None:
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} is not empty; pass --overwrite to replace its contents")


def staging_folder(dest: Path) -> Path:
    """A fresh folder beside `dest` (same filesystem where it can be, so the final move is a rename)."""
    return Path(tempfile.mkdtemp(prefix="llmopt-pull-", dir=dest.parent if dest.parent.exists() else None))


def install_verified(local: Path, staging: Path, dest: Path) -> list[str]:
    """Move the downloaded package `local` (inside `staging`) to `dest` if every sha256 matches;
    a damaged one stays where it is and its problems are returned."""
    problems = verify_package(local)
    if problems:
        return [f"{p} (download kept in {local} for inspection)" for p in problems]
    replace_dir(local, dest)
    shutil.rmtree(staging, ignore_errors=True)
    return []
