"""Classifying request bodies: which fields are read, what findings hold, redaction, configuration."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

import idgate.classify
from idgate.classify import (
    DEFAULT_LEVELS,
    Classification,
    Classifier,
    Detector,
    Finding,
    Levels,
    UnknownDataClass,
    classify,
    redact,
    resolve_class,
    texts_of,
)

CARD = "4111 1111 1111 1111"
EMAIL = "maria.santos@example.com"
PHONE = "(617) 253-1000"


def user(content: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]}


def counts(result: Classification) -> dict[str, int]:
    return {f.detector: f.count for f in result.findings}


def test_a_clean_chat_request_is_public() -> None:
    result = classify(user("What is the capital of Portugal?"))
    assert result == Classification("public", ())


def test_a_card_in_a_message_makes_the_request_confidential() -> None:
    result = classify(user(f"charge {CARD}"))
    assert result.data_class == "confidential"
    assert result.findings == (Finding("payment_card", "confidential", 1),)


def test_declaring_public_on_a_card_is_still_confidential() -> None:
    detected = classify(user(f"charge {CARD}")).data_class
    assert resolve_class("public", None, detected, DEFAULT_LEVELS) == "confidential"


def test_declaring_restricted_raises_the_class() -> None:
    detected = classify(user("hello")).data_class
    assert detected == "public"
    assert resolve_class("restricted", None, detected, DEFAULT_LEVELS) == "restricted"
    assert resolve_class(None, "internal", detected, DEFAULT_LEVELS) == "internal"


def test_the_highest_class_wins_and_findings_come_highest_first() -> None:
    token = "gh" + "p_" + "aB3dE5" * 6
    text = f"mail {EMAIL}, call {PHONE}, card {CARD}, another card 5555 5555 5555 4444, token {token}"
    result = classify(user(text))
    assert result.data_class == "restricted"
    assert [(f.detector, f.data_class, f.count) for f in result.findings] == [
        ("api_key", "restricted", 1),
        ("payment_card", "confidential", 2),
        ("email", "internal", 1),
        ("phone", "internal", 1),
    ]


# -- where the text is ------------------------------------------------------------------


def test_list_of_parts_content_is_scanned() -> None:
    body = user(
        [
            {"type": "text", "text": "see the image"},
            {"type": "image_url", "image_url": {"url": "https://example.org/a.png"}},
            {"type": "text", "text": f"and my card {CARD}"},
        ]
    )
    assert counts(classify(body)) == {"payment_card": 1}


def test_tool_call_arguments_and_tool_results_are_scanned() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "pay the hotel"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "pay", "arguments": json.dumps({"card": CARD.replace(" ", "-")})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": json.dumps({"receipt_to": EMAIL})},
        ],
    }
    assert counts(classify(body)) == {"payment_card": 1, "email": 1}


def test_json_encoded_text_with_escaped_newlines_is_read_right() -> None:
    # In JSON, "line\n4111..." puts an `n` right before the card; it must not count as a letter.
    note = f"items:\n{CARD}\n536-90-4399\n{PHONE}\n{EMAIL}\tDE89 3704 0044 0532 0130 00"
    arguments = json.dumps({"note": note})
    assert "\\n4111" in arguments
    body = {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": arguments}}]}]}
    assert counts(classify(body)) == {"payment_card": 1, "iban": 1, "us_ssn": 1, "email": 1, "phone": 1}
    assert redact(arguments) == (
        '{"note": "items:\\n[REDACTED:payment_card]\\n[REDACTED:us_ssn]\\n[REDACTED:phone]'
        '\\n[REDACTED:email]\\t[REDACTED:iban]"}'
    )


def test_tool_results_as_parts_and_legacy_function_calls_are_scanned() -> None:
    body = {
        "messages": [
            {"role": "assistant", "function_call": {"name": "f", "arguments": f'{{"to": "{EMAIL}"}}'}},
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": f"card {CARD}"}]},
            {"role": "assistant", "refusal": f"I will not call {PHONE}"},
        ]
    }
    assert counts(classify(body)) == {"payment_card": 1, "email": 1, "phone": 1}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"model": "e", "input": f"card {CARD}"}, {"payment_card": 1}),
        ({"model": "e", "input": ["hello", f"mail {EMAIL}"]}, {"email": 1}),
        ({"model": "e", "input": [1, 2, 3]}, {}),  # token ids: no text
        ({"model": "e", "input": [[4111, 1111], [1111, 1111]]}, {}),
        ({"model": "c", "prompt": [f"card {CARD}"]}, {"payment_card": 1}),
    ],
)
def test_embeddings_and_completions_input_is_scanned(body: dict[str, Any], expected: dict[str, int]) -> None:
    assert counts(classify(body)) == expected


def test_responses_api_items_are_scanned() -> None:
    body = {
        "model": "r",
        "instructions": f"reply to {EMAIL}",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "pay it"}]},
            {"type": "function_call", "call_id": "c", "name": "pay", "arguments": json.dumps({"card": CARD})},
            {"type": "function_call_output", "call_id": "c", "output": f"called {PHONE}"},
        ],
    }
    assert counts(classify(body)) == {"payment_card": 1, "email": 1, "phone": 1}


def test_malformed_bodies_do_not_break_classification() -> None:
    assert classify({}).data_class == "public"
    assert classify({"messages": "not a list", "input": {"odd": True}}).data_class == "public"
    assert classify({"messages": [None, 3, {"content": 5}, {"tool_calls": [None, {"function": "x"}]}]}) == (
        Classification("public")
    )


def test_texts_of_keeps_message_order() -> None:
    body = user([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert texts_of(body) == ["be brief", "a", "b"]


def test_joining_messages_makes_up_nothing() -> None:
    # Half a card in one message and half in the next are not a card.
    body = {"messages": [{"role": "user", "content": "4111 1111"}, {"role": "user", "content": "1111 1111"}]}
    assert classify(body).data_class == "public"


# -- findings never hold the matched text -----------------------------------------------


def test_findings_hold_names_and_counts_only() -> None:
    secrets = [CARD, EMAIL, PHONE, "536-90-4399", "DE89 3704 0044 0532 0130 00", "AKIA" + "IOSFODNN7EXAMPLE"]
    result = classify(user(" and ".join(secrets)))
    assert result.data_class == "restricted"
    record = json.dumps(result.record())
    shown = repr(result) + str(result) + record
    for secret in secrets:
        assert secret not in shown
        for piece in re.split(r"[ @().-]", secret):
            if len(piece) >= 4:
                assert piece not in shown, piece
    assert json.loads(record) == {
        "data_class": "restricted",
        "findings": [
            {"detector": "aws_access_key", "data_class": "restricted", "count": 1},
            {"detector": "payment_card", "data_class": "confidential", "count": 1},
            {"detector": "iban", "data_class": "confidential", "count": 1},
            {"detector": "us_ssn", "data_class": "confidential", "count": 1},
            {"detector": "email", "data_class": "internal", "count": 1},
            {"detector": "phone", "data_class": "internal", "count": 1},
        ],
    }


# -- redaction --------------------------------------------------------------------------


def test_redact_replaces_each_found_span() -> None:
    text = f"card {CARD}, mail {EMAIL}; call {PHONE}."
    assert redact(text) == "card [REDACTED:payment_card], mail [REDACTED:email]; call [REDACTED:phone]."


def test_redact_leaves_clean_text_alone() -> None:
    text = "nothing to see on 2024-04-12 here"
    assert redact(text) is text


def test_scan_gives_positions_only() -> None:
    text = f"x {EMAIL} y"
    spans = idgate.classify.DEFAULT_CLASSIFIER.scan(text)
    assert [(s.detector, text[s.start : s.end]) for s in spans] == [("email", EMAIL)]


# -- configuration ----------------------------------------------------------------------


def test_the_class_of_a_detector_can_be_configured() -> None:
    strict = Classifier(classes={"email": "confidential", "phone": "public"})
    result = strict.classify(user(f"{EMAIL} {PHONE}"))
    assert result.data_class == "confidential"
    assert result.findings == (Finding("email", "confidential", 1), Finding("phone", "public", 1))
    assert strict.classes["email"] == "confidential"


def test_configuring_an_unknown_detector_or_class_is_refused() -> None:
    with pytest.raises(ValueError, match="no detector named `emails`; detectors: `private_key`"):
        Classifier(classes={"emails": "internal"})
    with pytest.raises(UnknownDataClass, match="data class `secret` of detector `email` is not defined"):
        Classifier(classes={"email": "secret"})


def test_custom_levels_need_a_class_for_every_detector() -> None:
    levels = Levels(("open", "closed"))
    with pytest.raises(UnknownDataClass, match="defined classes: `open`, `closed`"):
        Classifier(levels)
    mapping = dict.fromkeys(idgate.classify.DEFAULT_CLASSES, "closed") | {"email": "open"}
    classifier = Classifier(levels, classes=mapping)
    assert classifier.classify(user("hi")).data_class == "open"
    assert classifier.classify(user(f"card {CARD}")).data_class == "closed"


def test_a_custom_detector() -> None:
    employee = Detector("employee_id", re.compile(r"EMP-[0-9]{6}\b"), gate=("EMP-",))
    classifier = Classifier(classes={"employee_id": "internal"}, detectors=[employee])
    assert counts(classifier.classify(user("ask EMP-004211 and EMP-123456"))) == {"employee_id": 2}
    assert classifier.redact("ask EMP-004211") == "ask [REDACTED:employee_id]"
    with pytest.raises(ValueError, match="detector `employee_id` has no data class"):
        Classifier(detectors=[employee])
    with pytest.raises(ValueError, match="detectors named twice: `employee_id`"):
        Classifier(classes={"employee_id": "internal"}, detectors=[employee, employee])


def test_the_public_surface() -> None:
    assert set(idgate.classify.__all__) == {
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
    }
    for name in idgate.classify.__all__:
        assert getattr(idgate.classify, name) is not None
