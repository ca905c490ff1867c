"""The quantize stage's schema: the union of every quantization method's config, selected by `method:`.

Each method declares its own config in its module (llmopt.methods.<name>); this module only joins
them, so adding a method adds no line here.
"""

from __future__ import annotations

from typing import Annotated, Union

from llmopt import methods
from pydantic import Field

METHODS = methods.discover()
QUANTIZE_METHODS = tuple(METHODS)
CONFIGS = {name: method.Config for name, method in METHODS.items()}

Quantize = Annotated[Union[tuple(CONFIGS.values())], Field(discriminator="method")]  # noqa: UP007 (a tuple of types)
