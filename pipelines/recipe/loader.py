"""Loading: name or path -> validated Recipe, or RecipeError lines naming file, line and field."""

from __future__ import annotations

import difflib
import hashlib
import os
from pathlib import Path
from typing import Any

import yaml
from llmopt.errors import RecipeError
from llmopt.recipe import STAGE_TYPES, Recipe
from llmopt.recipe.benchmark import Benchmark
from llmopt.recipe.compile import Compile
from llmopt.recipe.distill import Distill
from llmopt.recipe.evaluate import Evaluate
from llmopt.recipe.quantize import CONFIGS, QUANTIZE_METHODS
from llmopt.schema import RECIPES_DIR_ENV, _did_you_mean
from pydantic import (
    BaseModel,
    ValidationError,
)


def find_recipe(name_or_path: str, recipes_dir: Path | None = None) -> Path:
    """A path to a YAML file, or a name in the recipes folder (`tiny-int4`: recipes/tiny-int4.yaml).
    A bare file name that is not in the current folder is the recipes folder's file of that name
    (`tiny-int4.yaml`), as a recipe's name is its file name; `run` and `validate` print the path."""
    recipes_dir = recipes_dir or default_recipes_dir()
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if candidate.is_file():
            return candidate
        bare = name_or_path == candidate.name
        if bare and (recipes_dir / candidate.name).is_file():
            return recipes_dir / candidate.name
        folder = recipes_dir if bare else candidate.parent
        files = sorted(p.name for p in folder.glob("*") if p.suffix in (".yaml", ".yml"))
        close = [str(folder / name) for name in difflib.get_close_matches(candidate.name, files, n=3)]
        raise RecipeError(f"recipe file {candidate} does not exist" + (f"; did you mean {', '.join(close)}?" if close else ""))
    path = recipes_dir / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in recipes_dir.glob("*.yaml"))
        raise RecipeError(f"no recipe named {name_or_path!r}: {path} does not exist{_did_you_mean(name_or_path, known)} "
                          f"(available: {', '.join(known) or 'none'})")
    return path


def default_recipes_dir() -> Path:
    return Path(os.environ.get(RECIPES_DIR_ENV, "recipes"))


def load_recipe(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping with `name`, `model` and `stages`")
    try:
        return Recipe.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as e:
        # every error at once, one line each; pydantic reports a union's failure once per member
        lines = list(dict.fromkeys(_describe(error, path, text, data) for error in e.errors()))
        raise RecipeError("\n".join(lines)) from e


def _describe(first: dict, path: Path, text: str, data: dict) -> str:
    """One validation error as `file:line: field.path: message`."""
    loc = _field_path(first["loc"], data)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = first["ctx"]["discriminator"].strip("'")
        allowed = ", ".join(STAGE_TYPES if tag == "stage" else QUANTIZE_METHODS)
        loc = (*loc, tag)
        if first["type"] == "union_tag_invalid":
            message = f"unknown {tag} {first['ctx']['tag']!r}; expected one of: {allowed}"
        else:
            message = f"missing; expected one of: {allowed}"
    elif first["type"] == "extra_forbidden":
        message = "unknown key (misspelled?)"
        parent = _get(data, loc[:-1])
        if isinstance(parent, dict):
            known = _known_keys(loc, data)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            if close:
                message += f"; did you mean `{close[0]}`?"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict | list):
        message += f" (got {first['input']!r})"
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {_format_loc(loc) or 'recipe'}: {message}"


def _field_path(loc: tuple, data: dict) -> tuple:
    """Drop the discriminator tags pydantic puts in error locations (`stages.0.quantize.gptq.bits`)."""
    out: list = []
    for part in loc:
        node = _get(data, tuple(out))
        if isinstance(node, dict) and part not in node and part in (*STAGE_TYPES, *QUANTIZE_METHODS):
            continue
        out.append(part)
    return tuple(out)


def _get(data: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def _known_keys(loc: tuple, data: dict) -> list[str]:
    """Field names of the model the misspelled key sits in."""
    model: Any = Recipe
    node: Any = data
    for part in loc[:-1]:
        if isinstance(part, int):
            node = node[part]
            if model is list:
                model = _stage_model(node)
            continue
        node = node.get(part) if isinstance(node, dict) else None
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        model = list if part == "stages" else _model_of(annotation)
    return list(getattr(model, "model_fields", {}))


def _stage_model(node: Any) -> Any:
    if not isinstance(node, dict):
        return None
    if node.get("stage") == "quantize":
        return CONFIGS.get(node.get("method"))
    return {"evaluate": Evaluate, "distill": Distill, "benchmark": Benchmark, "compile": Compile}.get(node.get("stage"))


def _model_of(annotation: Any) -> Any:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _format_loc(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _line_of(text: str, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on `loc` that exists in the file."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def recipe_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
