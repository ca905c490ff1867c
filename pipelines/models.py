"""Base-model resolution (hub, local, embedded) and loading of checkpoints for evaluation."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import warnings
from pathlib import Path

from llmopt.cache import Artifact, directory_digest
from llmopt.recipe import ModelSpec

# What is fetched from the hub: safetensors weights and the JSON/tokenizer files, never pickles.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


def resolve_base(spec: ModelSpec, cache_root: Path, progress: bool = True) -> tuple[str, Artifact]:
    """The base model as a local directory, and its root cache key.

    Root key: hub id + resolved commit, a content hash of a local directory, or an embedded model's
    content hash (converted on first use and cached). `info["revision"]` is that commit or hash.
    """
    if spec.embedded is not None:
        from llmopt.embedded import EMBEDDED_MODELS

        embedded = EMBEDDED_MODELS[spec.embedded]
        revision = embedded.revision(cache_root)
        path = embedded.checkpoint(cache_root, progress)
        info = {"source": f"embedded:{spec.embedded}", "revision": revision, "upstream": embedded.upstream,
                "license": embedded.license}
        return f"embedded:{spec.embedded}@{revision}", Artifact(path, "hf-checkpoint", info=info)
    if spec.path is not None:
        digest = directory_digest(spec.path, cache_root / "digests.json")
        return f"local:{digest}", Artifact(spec.path, "hf-checkpoint", info={"source": str(spec.path), "revision": digest})
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if spec.trust_remote_code else [])
    path = Path(snapshot_download(spec.id, revision=spec.revision, allow_patterns=patterns))
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{spec.id}@{spec.revision} has no safetensors weights; llmopt does not load pickled weights")
    commit = path.name  # snapshot folders are named by the resolved commit
    return f"hub:{spec.id}@{commit}", Artifact(path, "hf-checkpoint", info={"source": f"{spec.id}@{commit}", "revision": commit})


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("the recipe asks for device: cuda, but no CUDA device is available")
    return requested


def hardware_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


TOKENIZER_PROBE = "The quick brown fox, 3 apples and 4 more: 7 apples. Ünïcode ✓ <s></s>"


def tokenizer_mismatch(teacher, student) -> str | None:
    """Why two tokenizers cannot share next-token distributions, or None when they can: the same
    vocabulary (token -> id) and the same ids for a probe text (catches a differing pre-tokenizer
    or normaliser over an identical vocabulary)."""
    a, b = teacher.get_vocab(), student.get_vocab()
    if a != b:
        differing = sum(1 for token, index in a.items() if b.get(token) != index) + len(b.keys() - a.keys())
        return f"its tokenizer differs from the teacher's (student {len(b)} tokens, teacher {len(a)}, {differing} differ)"
    if teacher.encode(TOKENIZER_PROBE) != student.encode(TOKENIZER_PROBE):
        return "its tokenizer splits text differently from the teacher's (same vocabulary, different pre-tokenizer)"
    return None


PLAIN_FORMATS = (None, "distilled")  # an unquantized checkpoint: a base model, or a distilled student


def load_model(artifact: Artifact, device: str, dtype: str = "auto", trust_remote_code: bool = False):
    """Load a checkpoint as the method that wrote it says (`info["format"]` names it; none: a plain
    checkpoint). Safetensors only."""
    fmt = artifact.info.get("format")
    if fmt in PLAIN_FORMATS:
        return load_plain(artifact.path, device, dtype, trust_remote_code)
    from llmopt import methods

    method = methods.by_format(fmt)
    method.import_libraries()
    return method.load(artifact, device, dtype, trust_remote_code)


def load_plain(path: Path, device: str, dtype: str = "auto", trust_remote_code: bool = False):
    """An unquantized checkpoint in the recipe's dtype."""
    return load_pretrained(path, device, trust_remote_code, dtype=torch_dtype(dtype, device))


def load_pretrained(path: Path, device: str, trust_remote_code: bool, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` as llmopt calls it: safetensors only, on `device`,
    remote code only when the recipe asks for it; `kwargs` from the method that loads it."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        # transformers warns that the checkpoint's own quantization_config wins: intended, we only name the kernel
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                     device_map=device, **kwargs)
    model.eval()
    return model


def import_detached(*names: str) -> None:
    """Import each module in `names` not yet imported on a thread of its own, so that no frame of
    the caller's stack is on the import's stack. GPTQModel keeps an exception it catches while
    importing (llama_cpp's ModuleNotFoundError), so its traceback's frames live on, and through their
    f_back every frame below on the stack that imported it, each with its locals as they were when
    it returned; importing `modelopt.torch` pins its importer's locals as well (measured, cause not
    traced). Imported inside a model loader, that kept the first model a process
    loaded alive for good: a bf16 base benchmarked after its candidate counted the candidate's whole
    batch-1 peak in its own (7B: 17.55 GB for 13.48 GB of weights, H100, 2026-12-06). Here the
    stack ends at the thread's start. An import error is raised in the caller, as an import would."""
    for name in names:
        if name not in sys.modules:
            _import_on_a_thread(name)


def _import_on_a_thread(name: str) -> None:
    failed: list[BaseException] = []

    def target() -> None:
        try:
            importlib.import_module(name)
        except BaseException as e:  # noqa: BLE001 (raised in the caller's thread below)
            failed.append(e)

    thread = threading.Thread(target=target, name=f"import {name}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def weights_bytes(path: Path) -> int:
    """Bytes of weights as stored on disk (packed quantized tensors count at their real size)."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def in_memory_bytes(model) -> int:
    """Bytes of parameters and buffers as they sit in memory (packed integer tensors at their size):
    the weights as served, after a kernel repacked them."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def quiet_libraries() -> None:
    """Keep library chatter (GPTQModel banners, transformers load bars) out of the run's output."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    # import-time notices about optional kernels this run does not use (torchao comes with GPTQModel)
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards": llmopt shows its own


@contextlib.contextmanager
def output_to(path: Path):
    """Send everything written to this process's stdout and stderr (Python and native code alike)
    to `path` for the duration: for libraries that print banners and bars of their own."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
