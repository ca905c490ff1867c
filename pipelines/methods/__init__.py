"""Quantization methods: one module each, registered by being a subclass of `Method`.

A method module declares, in one class:
- `name` (the recipe's `method:`) and `Config`, its pydantic schema;
- what it needs: `libraries` (import names, whose versions enter the cache key) and the pip `extra`
  that installs them;
- what it produces: the `formats` it writes into `Artifact.info["format"]` (how the loader finds
  it again), the rows it adds to the serving table (`serving`: format -> `Serving`), the metrics
  it logs (`metrics`);
- its functions: `quantize`, `load`, `describe` (the lineage), `card` and `limits` (model card),
  `check` and `refuse_runtime` (validation), `serving_format` (which serving-table row a config
  becomes), and `fast_path` (the decode kernels of the compiled runtime; see llmopt.kernels).

Everything that used to list methods is built from these declarations: the recipe's `method:`
union and its error messages, the stage catalogue's libraries and extras, the validator, the
model loader, the serving-format table (llmopt.export.support), the model card, the lineage and
the metric catalogue of the promotion gates. Adding a method is one new module in this package
(and its test); `discover` imports every module here.

Method modules are imported at validation time: at module level they import only pydantic and
llmopt.schema; torch and the quantization libraries are imported inside their functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from llmopt.plugins import Registry, import_modules

if TYPE_CHECKING:
    from llmopt.cache import Artifact
    from llmopt.stages import StageContext

_METHODS = Registry("quantization methods")

# metrics every quantize stage logs, whatever the method
COMMON_METRICS = ("memory/weights_gb", "memory/weights_gb_base", "memory/compression_ratio")


@dataclass(frozen=True)
class Serving:
    """One row of the serving table (llmopt.export.support): a format a method produces.

    `min_sm`: the smallest compute capability TensorRT-LLM runs it on; `below_min`: the nearest
    valid choice on an older GPU; `refused`: target -> (why not, nearest valid route)."""

    min_sm: int | None  # None: TensorRT-LLM does not load this format at all (then `refused` says why)
    below_min: str = "a GPU of SM80 or newer"
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)


class Method:
    """A quantization method. Subclasses register themselves (by `name`) when their module is imported."""

    name: ClassVar[str]
    Config: ClassVar[type]  # pydantic model with `stage: Literal["quantize"]` and `method: Literal[name]`
    summary: ClassVar[str] = ""  # one line for `llmopt methods` and the README
    libraries: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str | None] = None  # `pip install 'llmopt[extra]'` installs the libraries
    formats: ClassVar[tuple[str, ...]] = ()  # values of Artifact.info["format"] this method writes
    serving: ClassVar[dict[str, Serving]] = {}
    metrics: ClassVar[tuple[str, ...]] = ()  # what quantize logs beyond COMMON_METRICS
    # its library's own model is not the format (ModelOpt's fake quantization): timing it needs a kernel
    timed_only_with_kernel: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _METHODS.add(cls)

    # --- what a recipe's config becomes (validation; no torch) ------------------------------------

    @classmethod
    def serving_format(cls, cfg) -> str:
        """The serving-table row this config produces (`bf16` for weights saved dequantized)."""
        return cls.name

    @classmethod
    def describe(cls, cfg) -> str:
        """The lineage step: `gptq 4-bit`."""
        return f"{cls.name} {cfg.bits}-bit"

    @classmethod
    def check(cls, cfg, model_config: dict) -> tuple[str, str] | None:
        """(field, why) when the config cannot work on a model with this config.json; None when it can."""
        return None

    @classmethod
    def refuse_runtime(cls, cfg, runtime: str, kernel: str) -> str | None:
        """Why a benchmark with this runtime and kernel cannot time this method's output, or None."""
        return None

    @classmethod
    def serve_check(cls, cfg, sm: int, gpu: str) -> tuple[str, str] | None:
        """(field, why) when a bundle for a GPU of compute capability `sm` cannot serve this config
        beyond what its serving row says; None otherwise."""
        return None

    # --- run time ----------------------------------------------------------------------------------

    @classmethod
    def quantize(cls, cfg, src: Artifact, out: Path, ctx: StageContext) -> Artifact:
        raise NotImplementedError

    @classmethod
    def import_libraries(cls) -> None:
        """Import the libraries its load and fast path use in the measuring process, before a model
        exists, on a thread of their own (llmopt.models.import_detached: GPTQModel and ModelOpt pin
        the frames that import them); the loaders call it first. None by default."""

    @classmethod
    def load(cls, artifact: Artifact, device: str, dtype: str, trust_remote_code: bool):
        """The model the artifact holds, as the evaluation and benchmark stages run it."""
        from llmopt.models import load_plain

        return load_plain(artifact.path, device, dtype, trust_remote_code)

    @classmethod
    def load_for_kernel(cls, artifact: Artifact, device: str, dtype: str, trust_remote_code: bool):
        """The model a fast kernel's `fast_path` starts from (llmopt.kernels.load_accelerated): the
        artifact's model unless the fast path rebuilds it from elsewhere and needs less."""
        return cls.load(artifact, device, dtype, trust_remote_code)

    # --- decode kernels (llmopt.kernels) -------------------------------------------------------------

    @classmethod
    def kernel_spec(cls, cfg) -> dict:
        """What decides which kernels can run this config's output; kept in `info["kernel_spec"]`."""
        return {k: getattr(cfg, k) for k in ("bits", "group_size", "sym", "desc_act", "format") if hasattr(cfg, k)}

    @classmethod
    def kernel_candidates(cls, spec: dict, device: str) -> tuple[str, ...]:
        """Kernels that can run this format on this kind of device (`cpu`/`cuda`), best first (by
        measurement); before the GPU's compute capability is checked."""
        return ()

    @classmethod
    def kernels(cls, spec: dict, device: str, sm: int | None) -> tuple[str, ...]:
        from llmopt.kernels import usable

        return usable(cls.kernel_candidates(spec, "cuda" if device.startswith("cuda") else "cpu"), device, sm)

    @classmethod
    def no_kernel_reason(cls, spec: dict, device: str, sm: int | None) -> str:
        found = cls.kernel_candidates(spec, "cuda" if device.startswith("cuda") else "cpu")
        if found:
            from llmopt.kernels import runs_on

            return "; ".join(runs_on(k, device, sm) or k for k in found)
        return f"llmopt has no fast kernel for {cls.name} {spec} on {device}"

    @classmethod
    def fast_path(cls, model, artifact: Artifact, device: str, kernel: str, dense_below: int = 0,
                  dense_prefill_tokens: int | str = 0) -> tuple[Any, int]:
        """Swap the model's quantized layers for modules running `kernel` (one of `kernels`), those
        with fewer than `dense_below` weights for their dequantized weight, and with
        `dense_prefill_tokens` each integer kernel's products of that many rows dense (`swap`); returns
        (model, layers swapped). Each method reads its own format."""
        raise NotImplementedError(f"{cls.name} declares no fast path")

    # --- the model card ----------------------------------------------------------------------------

    @classmethod
    def card(cls, info: dict) -> list[str]:
        """How to serve the artifact (markdown lines)."""
        return ["`AutoModelForCausalLM.from_pretrained('model', use_safetensors=True)`; vLLM and SGLang load the "
                "same folder."]

    @classmethod
    def limits(cls, info: dict) -> list[str]:
        return []


def discover() -> dict[str, type[Method]]:
    """Every method, by name: imports each module of this package once."""
    import_modules(__name__, __path__)
    return dict(sorted(_METHODS.items()))


def get(name: str) -> type[Method]:
    methods = discover()
    if name not in methods:
        raise KeyError(f"unknown quantization method {name!r}; known: {', '.join(methods)}")
    return methods[name]


def writing(fmt: str | None) -> type[Method] | None:
    """The method that writes artifacts of this `info["format"]`, if any (none for a plain checkpoint)."""
    return next((method for method in discover().values() if fmt in method.formats), None)


def by_format(fmt: str) -> type[Method]:
    """The method that writes artifacts of this `info["format"]`."""
    method = writing(fmt)
    if method is None:
        raise KeyError(f"no quantization method writes format {fmt!r}")
    return method
