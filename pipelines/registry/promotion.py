"""A run's registration: the lineage, the model card and the version's tags, from the recipe and
the run's metrics; the runner calls it once every stage is done."""

from __future__ import annotations

import json
import logging

from llmopt import methods
from llmopt.cache import Artifact
from llmopt.recipe import Recipe
from llmopt.registry.card import model_card
from llmopt.registry.gates import Gate, judge
from llmopt.registry.package import content_digest
from llmopt.registry.store import Registration, register
from llmopt.stages.catalog import STAGES

log = logging.getLogger("llmopt")


def register_run(tracker, recipe: Recipe, parent: str, final: Artifact, metrics: dict[str, float],
                 tags: dict[str, str], root: tuple[str, Artifact], cache_keys: dict[str, str]) -> Registration:
    """Register a run's final artifact (a new model version with its card, or the version that
    already holds it) and move the alias; the run's tags say what happened."""
    root_key, base = root
    source = recipe.model.id or str(recipe.model.path or f"embedded:{recipe.model.embedded}")
    def step(cfg) -> str:
        detail = {"quantize": lambda: methods.get(cfg.method).describe(cfg),
                  "compile": lambda: cfg.target, "distill": lambda: "student"}[cfg.stage]()
        return f"{cfg.name} ({detail})"

    steps = [step(cfg) for cfg in recipe.stages if STAGES[cfg.stage].produces_model]
    lineage = " -> ".join([f"{source}@{recipe.model.revision}" if recipe.model.id else source, *steps])
    gate_lines, _ = judge([Gate.parse(g) for g in recipe.promote.gates], metrics)
    card = model_card(recipe, final, metrics, lineage, gate_lines, tags, parent, base.info)
    digest = content_digest(final.path)
    version_tags = {"llmopt.recipe": recipe.name, "llmopt.recipe_hash": tags["llmopt.recipe_hash"],
                    "llmopt.run_id": parent, "llmopt.base_model": source,
                    "llmopt.base_revision": base.info["revision"], "llmopt.base_key": root_key,
                    "llmopt.lineage": lineage,
                    "llmopt.cache_keys": json.dumps(cache_keys),
                    "llmopt.hardware": tags["llmopt.hardware"]}
    result = register(tracker, recipe.promote, parent, final.path, metrics, card, version_tags, digest)
    verdict = "passed" if not result.failed else "failed: " + "; ".join(result.failed)
    tracker.log(parent, tags={"llmopt.registered": f"{result.name}/{result.version}", "llmopt.alias": result.alias,
                              "llmopt.promotion_gates": verdict, "llmopt.registration": result.note or "new version"})
    log.info("registered %s version %s, alias %s (gates %s; %s)", result.name, result.version, result.alias, verdict,
             result.note or "new version")
    return result
