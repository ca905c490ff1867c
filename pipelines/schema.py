"""The pieces every stage's schema uses: strict models, paths relative to the recipe, data and model sources."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    PositiveInt,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

RECIPES_DIR_ENV = "LLMOPT_RECIPES_DIR"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _resolve_path(value: Any, info: ValidationInfo) -> Any:
    """Relative paths in a recipe are relative to the recipe file's folder."""
    base = (info.context or {}).get("base_dir")
    if isinstance(value, str):
        value = Path(value).expanduser()
        if base is not None and not value.is_absolute():
            value = Path(base) / value
        return value.resolve()
    return value


class DatasetSpec(Strict):
    """Text records from a local file (`path`), a hub dataset (`hub`, `config`, `split`), or the
    generated corpus the embedded model was trained on (`embedded: tiny-stories`, `split`)."""

    path: Path | None = None
    hub: str | None = None
    embedded: Literal["tiny-stories"] | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    _resolve = field_validator("path", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetSpec:
        if sum(x is not None for x in (self.path, self.hub, self.embedded)) != 1:
            raise ValueError("give exactly one of `path` (a local .txt/.jsonl/.json file), `hub` (a dataset name) "
                             "or `embedded: tiny-stories`")
        if self.path is not None:
            check_text_file(self.path, self.text_field)
        if self.embedded is not None and self.split not in ("train", "calibration", "validation"):
            raise ValueError(f"the embedded corpus has splits train, calibration, validation (got {self.split!r})")
        return self


def check_text_file(path: Path, text_field: str) -> None:
    """Refuse a missing, unreadable, empty or malformed local text file before any work starts."""
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(TEXT_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not text.strip():
        raise ValueError(f"file {path} is empty")
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _check_record(_parse_json(line, path, lineno), text_field, f"{path}:{lineno}")
    elif path.suffix == ".json":
        records = _parse_json(text, path, 1)
        if not isinstance(records, list) or not records:
            raise ValueError(f"{path}: expected a non-empty JSON list of records")
        for i, record in enumerate(records):
            _check_record(record, text_field, f"{path}[{i}]")


def _parse_json(text: str, path: Path, lineno: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from e


def _check_record(record: Any, text_field: str, where: str) -> None:
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise ValueError(f"{where}: record has no string field {text_field!r} (set `text_field`)")


class ModelSpec(Strict):
    """The base model: a hub id (with revision), a local directory, or an embedded model."""

    id: str | None = None
    revision: str = "main"
    path: Path | None = None
    embedded: Literal["smollm2-135m", "tiny-llama"] | None = None
    trust_remote_code: StrictBool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    _resolve = field_validator("path", mode="before")(_resolve_path)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        given = [k for k in ("id", "path", "embedded") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `id` (hub model id), `path` (local directory) or `embedded`")
        if self.path is not None and not (self.path / "config.json").is_file():
            raise ValueError(f"local model directory {self.path} does not exist or has no config.json")
        return self


class CalibrationSpec(Strict):
    dataset: DatasetSpec
    num_samples: PositiveInt = 128
    seq_len: PositiveInt = 512
    seed: int = 0




def _check_group_size(value: int) -> int:
    if value != -1 and value <= 0:
        raise ValueError("group_size must be a positive number of columns, or -1 for one group per row")
    return value




def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""
