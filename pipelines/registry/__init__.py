"""Model registry: promotion gates, registration with a model card, aliases, and pulling a
promoted artifact back with every sha256 checked.

    gates.py    a gate parsed and judged; the metrics a recipe's stages log, checked before a run
    package.py  the package on disk: content digest, manifest, verification, a pull's staging
    card.py     the package's MODEL_CARD.md
    store.py    MLflow: register, aliases, promote, resolve, pull (the only module here that imports mlflow)

Importing this package does not import mlflow: `llmopt validate` checks gates without it.
"""

from llmopt.registry.card import model_card
from llmopt.registry.gates import OPS, Gate, check_gates, judge, known_metrics
from llmopt.registry.package import CARD, MODEL_DIR, PACKAGE_MANIFEST, content_digest, verify_package, write_package
from llmopt.registry.store import (
    ALIAS_RE,
    CANDIDATE,
    Registration,
    check_alias,
    check_promotion_alias,
    promote_version,
    pull,
    register,
    resolve,
)

__all__ = ["ALIAS_RE", "CANDIDATE", "CARD", "MODEL_DIR", "OPS", "PACKAGE_MANIFEST", "Gate", "Registration",
           "check_alias", "check_gates", "check_promotion_alias", "content_digest", "judge", "known_metrics", "model_card",
           "promote_version", "pull", "register", "resolve", "verify_package", "write_package"]
