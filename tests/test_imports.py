"""Import rules, read from the source with `ast` (imports inside functions too): only the tracking
module and the registry's store talk to MLflow, and the code that computes an output (stages, eval,
export) never imports the run bookkeeping (tracking, runner, registry)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from importlib.util import resolve_name
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLFLOW_ALLOWED = {"llmopt.tracking", "llmopt.registry.store"}
COMPUTE = ("llmopt.stages", "llmopt.eval", "llmopt.export")
BOOKKEEPING = ("llmopt.tracking", "llmopt.runner", "llmopt.registry")


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _modules() -> dict[str, Path]:
    """Every module of the llmopt package, found through pyproject's package-dir: name -> source file."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for package, folder in package_dir.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found.setdefault(".".join((package, *parts)).removesuffix(".__init__"), path)
    return found


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for each import in `name`; `from a import b` counts as a and a.b (b may
    be a module), and `importlib.import_module("a")` as a."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve_name("." * node.level + (node.module or ""), here) if node.level else node.module
            found += [(base, node.lineno)] + [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node.lineno))
    return found


def _violations(importers, imported: tuple[str, ...]) -> list[str]:
    """One line per offending import statement, naming the shortest module it reaches."""
    hits: dict[tuple[str, int, str], str] = {}
    for name, path in _modules().items():
        if importers(name):
            for module, line in _imports(name, path):
                if any(_within(module, p) for p in imported):
                    where = (str(path.relative_to(ROOT)), line, name)
                    hits[where] = min(hits.get(where, module), module, key=len)
    return [f"{file}:{line} ({name}) imports {module}" for (file, line, name), module in sorted(hits.items())]


def test_every_module_is_walked():
    """The rules below see the whole package: the modules they are about are among those walked."""
    modules = _modules()
    assert {"llmopt.cli", "llmopt.tracking", "llmopt.runner", "llmopt.registry", "llmopt.registry.store",
            "llmopt.registry.gates", "llmopt.stages", "llmopt.stages.evaluate", "llmopt.eval.bench",
            "llmopt.export.manifest"} <= set(modules)
    assert all(path.is_file() for path in modules.values())


def test_only_tracking_and_the_registry_store_import_mlflow():
    found = _violations(lambda name: name not in MLFLOW_ALLOWED, ("mlflow",))
    assert not found, "only llmopt.tracking and llmopt.registry.store may import mlflow:\n" + "\n".join(found)


def test_stages_eval_and_export_do_not_import_run_bookkeeping():
    found = _violations(lambda name: any(_within(name, p) for p in COMPUTE), BOOKKEEPING)
    assert not found, ("stages, eval and export compute outputs; they must not import tracking, runner or registry:\n"
                       + "\n".join(found))


def test_importing_the_registry_does_not_import_mlflow():
    """`llmopt validate` checks gates through llmopt.registry: that must not pay for mlflow."""
    code = "import sys, llmopt.registry; assert 'mlflow' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


HEAVY = ("torch", "transformers", "gptqmodel", "bitsandbytes", "modelopt", "tensorrt_llm", "optimum", "lm_eval", "mlflow")
PLUGINS = ("llmopt.methods", "llmopt.eval.runtimes")


def test_method_and_runtime_modules_import_nothing_heavy_at_module_level():
    """Validation imports every quantization method and benchmark runtime (they declare the recipe's
    choices): at module level they may import only light modules; torch and the quantization
    libraries are imported inside their functions."""
    found = []
    for name, path in _modules().items():
        if any(_within(name, p) for p in PLUGINS):
            tree = ast.parse(path.read_text(), str(path))
            for node in tree.body:  # module level only
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if any(_within(n, h) for h in HEAVY)]
    assert not found, "\n".join(found)
    assert {"llmopt.methods.gptq", "llmopt.eval.runtimes.compiled"} <= set(_modules()), "the plugin modules were walked"
