"""The demo policy of the embedded default: tenant isolation, data-class limits, agents, refunds.

`policy.cedar` holds the rules, `entities.yaml` the grants and example resources,
`models.yaml` the embedded default's models (a gateway takes them from its
config instead), and `tests.yaml` the cases `idgate policy test` runs.
"""

from __future__ import annotations

from pathlib import Path

from idgate.policy.data_classes import DataClasses
from idgate.policy.entities import EntityData
from idgate.policy.store import PolicyStore

__all__ = ["ENTITIES", "MODELS", "POLICY", "TESTS", "demo_store"]

POLICY = Path(__file__).parent / "policy.cedar"
ENTITIES = Path(__file__).parent / "entities.yaml"
MODELS = Path(__file__).parent / "models.yaml"
TESTS = Path(__file__).parent / "tests.yaml"


def demo_store(models: EntityData | None = None, classes: DataClasses | None = None) -> PolicyStore:
    """The demo policy and entities, with `models` (from the config) or else models.yaml's."""
    if models is None:
        return PolicyStore([POLICY], entity_files=[ENTITIES, MODELS], classes=classes)
    return PolicyStore([POLICY], entities=models, entity_files=[ENTITIES], classes=classes)
