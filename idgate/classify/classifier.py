"""The classifier: runs the detectors over a request and says what class its content is.

    classifier = Classifier(levels, classes={"email": "confidential"}, detectors=builtin_detectors("GB"))
    result = classifier.classify(body)        # Classification(data_class, findings)
    record["classification"] = result.record()
    text = classifier.redact(text)            # "card [REDACTED:payment_card]"

Findings carry detector names and counts only, never the text that matched:
they go into audit records.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from idgate.classify.content import texts_of
from idgate.classify.detectors import DEFAULT_CLASSES, Detector, builtin_detectors
from idgate.classify.levels import DEFAULT_LEVELS, Ordering, UnknownDataClass

__all__ = ["Classification", "Classifier", "Finding", "Span"]


class Span(NamedTuple):
    """Where a detector found something: positions only."""

    detector: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Finding:
    """How many times one detector fired, and the class that implies."""

    detector: str
    data_class: str
    count: int


@dataclass(frozen=True, slots=True)
class Classification:
    """The detected class of some content and the findings behind it (highest class first)."""

    data_class: str
    findings: tuple[Finding, ...] = ()

    def record(self) -> dict[str, Any]:
        """A JSON-ready form for audit records."""
        return {
            "data_class": self.data_class,
            "findings": [{"detector": f.detector, "data_class": f.data_class, "count": f.count} for f in self.findings],
        }


class Classifier:
    """Detectors with the class each one implies, over an ordering of classes.

    `classes` maps detector names to class names, over `DEFAULT_CLASSES`.
    Detectors run highest class first; where two find overlapping text, the
    one that ran first keeps it, so a card number inside an IBAN, or a JWT
    after `Bearer`, counts once.
    """

    __slots__ = ("_levels", "_lowest", "_plan")

    def __init__(
        self,
        levels: Ordering = DEFAULT_LEVELS,
        classes: Mapping[str, str] | None = None,
        detectors: Sequence[Detector] | None = None,
    ) -> None:
        chosen = builtin_detectors() if detectors is None else tuple(detectors)
        names = [d.name for d in chosen]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"detectors named twice: {', '.join(f'`{n}`' for n in twice)}")
        overrides = dict(classes or {})
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            known = ", ".join(f"`{n}`" for n in names)
            raise ValueError(f"no detector named {', '.join(f'`{n}`' for n in unknown)}; detectors: {known}")
        mapping = {n: DEFAULT_CLASSES[n] for n in names if n in DEFAULT_CLASSES} | overrides
        plan: list[tuple[Detector, str, int]] = []
        for detector in chosen:
            data_class = mapping.get(detector.name)
            if data_class is None:
                raise ValueError(f"detector `{detector.name}` has no data class; give it one in `classes`")
            if data_class not in levels.names:
                raise UnknownDataClass(data_class, levels.names, where=f" of detector `{detector.name}`")
            plan.append((detector, data_class, levels.rank(data_class)))
        plan.sort(key=lambda step: -step[2])  # stable: equal classes keep their given order
        self._plan = tuple(plan)
        self._levels = levels
        self._lowest = levels.names[0]

    @property
    def levels(self) -> Ordering:
        return self._levels

    @property
    def classes(self) -> dict[str, str]:
        """Detector name to the class it implies, in the order the detectors run."""
        return {detector.name: data_class for detector, data_class, _ in self._plan}

    def scan(self, text: str) -> list[Span]:
        """Non-overlapping spans the detectors found in `text`, in text order."""
        starts: list[int] = []
        spans: list[Span] = []
        regions: dict[re.Pattern[str], list[tuple[int, int]]] = {}

        def taken(start: int, end: int) -> int | None:
            # INVARIANT: `spans` are sorted and disjoint, so their ends are sorted too.
            at = bisect_right(starts, start)
            if at > 0 and spans[at - 1].end > start:
                return spans[at - 1].end
            if at < len(spans) and spans[at].start < end:
                return spans[at].end
            return None

        for detector, _, _ in self._plan:
            if not detector.may_match(text):
                continue  # why: most gates fail on ordinary text; this skips making a generator
            within = detector.within
            if within is not None:
                if within not in regions:
                    regions[within] = [m.span() for m in within.finditer(text)]
                if not regions[within]:
                    continue  # why: no region (e.g. no run of digits), nothing for this detector to look at
            found = detector.spans(text, None if within is None else regions[within], taken if spans else None)
            for start, end in found:
                if spans and taken(start, end) is not None:  # a confirm step may widen a span
                    continue
                at = bisect_right(starts, start)
                starts.insert(at, start)
                spans.insert(at, Span(detector.name, start, end))
        return spans

    def classify_text(self, text: str) -> Classification:
        """The class of one text, and the findings behind it."""
        spans = self.scan(text) if text else []
        if not spans:
            return Classification(self._lowest)
        counts: dict[str, int] = {}
        for span in spans:
            counts[span.detector] = counts.get(span.detector, 0) + 1
        findings = tuple(
            Finding(detector.name, data_class, counts[detector.name])
            for detector, data_class, _ in self._plan
            if detector.name in counts
        )
        return Classification(findings[0].data_class, findings)

    def classify(self, body: Mapping[str, Any]) -> Classification:
        """The class of an OpenAI chat, embeddings or responses request body (see `texts_of`)."""
        # One joined text: one pass per detector instead of one per message. Only a
        # private key block spans lines, so the joins make up no numbers, words or tokens.
        return self.classify_text("\n".join(texts_of(body)))

    def redact(self, text: str) -> str:
        """`text` with every found span replaced by `[REDACTED:<detector>]`."""
        spans = self.scan(text)
        if not spans:
            return text
        pieces: list[str] = []
        last = 0
        for span in spans:
            pieces.append(text[last : span.start])
            pieces.append(f"[REDACTED:{span.detector}]")
            last = span.end
        pieces.append(text[last:])
        return "".join(pieces)
