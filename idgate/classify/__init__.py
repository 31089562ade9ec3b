"""The classify stage: the data class of a request, from labels and detectors.

A request's class is the highest of the class its caller declares, the class
configured for the caller's tenant or app, and what the built-in detectors find
in its messages (`resolve_class`). Detectors look for credentials and private
keys (`restricted`), payment cards, IBANs and US SSNs (`confidential`), e-mail
addresses and phone numbers (`internal`); see `idgate.classify.detectors`.

    found = classify(body)                                   # Classification
    data_class = resolve_class(declared, configured, found.data_class, levels)

`classify` and `redact` use the built-in detectors and default classes; build a
`Classifier` for other levels, classes, detectors or phone region.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idgate.classify.classifier import Classification, Classifier, Finding, Span
from idgate.classify.content import texts_of
from idgate.classify.detectors import (
    DEFAULT_CLASSES,
    DEFAULT_PHONE_REGION,
    NUMBER_RUNS,
    Confirm,
    Detector,
    builtin_detectors,
)
from idgate.classify.levels import DEFAULT_LEVELS, DEFAULT_NAMES, Levels, Ordering, UnknownDataClass, resolve_class

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_CLASSIFIER",
    "DEFAULT_LEVELS",
    "DEFAULT_NAMES",
    "DEFAULT_PHONE_REGION",
    "NUMBER_RUNS",
    "Classification",
    "Classifier",
    "Confirm",
    "Detector",
    "Finding",
    "Levels",
    "Ordering",
    "Span",
    "UnknownDataClass",
    "builtin_detectors",
    "classify",
    "redact",
    "resolve_class",
    "texts_of",
]

DEFAULT_CLASSIFIER = Classifier()
"""The built-in detectors with their default classes over the default levels (immutable)."""


def classify(body: Mapping[str, Any]) -> Classification:
    """The detected class of an OpenAI chat, embeddings or responses request body, with findings."""
    return DEFAULT_CLASSIFIER.classify(body)


def redact(text: str) -> str:
    """`text` with everything the built-in detectors find replaced by `[REDACTED:<detector>]`."""
    return DEFAULT_CLASSIFIER.redact(text)
