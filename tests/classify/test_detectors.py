"""Each built-in detector: what it flags, what it must not, and the class that implies.

Secrets are assembled at run time (or generated, for private keys) so that no
file in the repository looks like a leaked credential to a secret scanner.
"""

from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from idgate.classify import DEFAULT_CLASSIFIER, Classifier, builtin_detectors


def found(text: str, classifier: Classifier = DEFAULT_CLASSIFIER) -> dict[str, int]:
    return {f.detector: f.count for f in classifier.classify_text(text).findings}


def data_class(text: str) -> str:
    return DEFAULT_CLASSIFIER.classify_text(text).data_class


def break_luhn(number: str) -> str:
    """The same digits with the last one changed: the Luhn check then fails."""
    return number[:-1] + str((int(number[-1]) + 1) % 10)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(header: dict[str, str]) -> str:
    payload = {"sub": "alice", "iat": 1700000000}
    parts = [b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), b64url(b"s" * 32)]
    return ".".join(parts)


AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example, assembled
OPENAI_KEY = "sk-" + "proj-" + "Xy9kQ2" * 8
GITHUB_TOKEN = "gh" + "p_" + "aB3dE5" * 6
SLACK_TOKEN = "xox" + "b-" + "1234567890-" + "AbCdEf1234"


# -- payment cards ----------------------------------------------------------------------

CARDS = [
    "4111 1111 1111 1111",  # Visa, spaces
    "4111-1111-1111-1111",  # Visa, dashes
    "4111111111111111",  # Visa, plain
    "5555 5555 5555 4444",  # Mastercard
    "2223 0031 2200 3222",  # Mastercard 2-series
    "3782 822463 10005",  # Amex 4-6-5
    "378282246310005",
    "6011 1111 1111 1117",  # Discover
    "3056 930902 5904",  # Diners 4-6-4
]


@pytest.mark.parametrize("card", CARDS)
def test_a_card_number_with_a_valid_luhn_is_confidential(card: str) -> None:
    text = f"please charge my card {card} for the deposit"
    assert found(text) == {"payment_card": 1}
    assert data_class(text) == "confidential"


@pytest.mark.parametrize("card", CARDS)
def test_the_same_digits_with_an_invalid_luhn_are_not_flagged(card: str) -> None:
    text = f"please charge my card {break_luhn(card)} for the deposit"
    assert "payment_card" not in found(text)
    assert data_class(text) != "confidential"


def test_an_invalid_luhn_leaves_the_text_public() -> None:
    assert found("card 4111 1111 1111 1112") == {}
    assert data_class("card 4111-1111-1111-1112") == "public"
    # (Ten of the digits of a broken card can still read as a phone number:
    # "3056 930902 5905" holds (305) 693-0902. That one is `internal`, not a card.)
    assert found("card 3056 930902 5905") == {"phone": 1}


def test_a_card_next_to_its_expiry_date_and_code_is_found() -> None:
    assert found("card 4111 1111 1111 1111 12/27 123, thanks") == {"payment_card": 1}


@pytest.mark.parametrize(
    "text",
    [
        "order x4111111111111111",  # glued to a word
        "id 41111111111111110000",  # inside a longer number
        "1000 4111 1111 1111 1111 2000 3000",  # a table of four-digit numbers
        "3111 1111 1111 1111",  # no network starts with 31
        "4111 1111 11111 111",  # not a grouping anyone writes
    ],
)
def test_card_shaped_digits_that_are_not_a_card(text: str) -> None:
    assert "payment_card" not in found(text)


# -- IBANs ------------------------------------------------------------------------------

IBANS = [
    "DE89 3704 0044 0532 0130 00",
    "DE89370400440532013000",
    "GB82 WEST 1234 5698 7654 32",
    "FR14 2004 1010 0505 0001 3M02 606",
    "NO93 8601 1117 947",
    "BE68 5390 0754 7034",
]


@pytest.mark.parametrize("iban", IBANS)
def test_an_iban_with_a_valid_checksum_is_confidential(iban: str) -> None:
    text = f"wire it to {iban} today"
    assert found(text) == {"iban": 1}
    assert data_class(text) == "confidential"


@pytest.mark.parametrize("iban", IBANS)
def test_an_iban_with_a_wrong_checksum_is_not_flagged(iban: str) -> None:
    text = f"wire it to {break_luhn(iban)} today"
    assert found(text) == {}


def test_an_iban_followed_by_a_short_word_is_found_without_it() -> None:
    text = "IBAN BE68 5390 0754 7034 TEST"
    assert DEFAULT_CLASSIFIER.redact(text) == "IBAN [REDACTED:iban] TEST"


# -- US SSNs ----------------------------------------------------------------------------


@pytest.mark.parametrize("ssn", ["536-90-4399", "123-45-6789", "078-05-1121", "536 90 4399"])
def test_a_valid_ssn_is_confidential(ssn: str) -> None:
    text = f"my SSN is {ssn}."
    assert found(text) == {"us_ssn": 1}
    assert data_class(text) == "confidential"


@pytest.mark.parametrize(
    "ssn",
    [
        "000-12-3456",  # area 000
        "666-12-3456",  # area 666
        "900-12-3456",  # area 9xx
        "999-12-3456",
        "123-00-4567",  # group 00
        "123-45-0000",  # serial 0000
        "078-05-1120",  # the Woolworth wallet card, never valid
        "536-90-4399-1",  # part of something longer
        "536-90 4399",  # mixed separators
    ],
)
def test_an_ssn_in_an_invalid_range_is_not_flagged(ssn: str) -> None:
    assert found(f"my SSN is {ssn}.") == {}


# -- credentials ------------------------------------------------------------------------


def _pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, form: serialization.PrivateFormat) -> str:
    return key.private_bytes(serialization.Encoding.PEM, form, serialization.NoEncryption()).decode()


@pytest.mark.parametrize(
    "pem",
    [
        _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
        _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.TraditionalOpenSSL),
        _pem(ed25519.Ed25519PrivateKey.generate(), serialization.PrivateFormat.OpenSSH),
    ],
    ids=["pkcs8", "ec", "openssh"],
)
def test_a_private_key_block_is_restricted(pem: str) -> None:
    text = f"here is the deploy key:\n{pem.strip()}\nuse it carefully"
    assert found(text) == {"private_key": 1}
    assert data_class(text) == "restricted"
    assert DEFAULT_CLASSIFIER.redact(text) == "here is the deploy key:\n[REDACTED:private_key]\nuse it carefully"


def test_a_private_key_inside_json_escaped_tool_arguments_is_found() -> None:
    pem = _pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8)
    assert found(json.dumps({"key": pem})) == {"private_key": 1}


def test_a_private_key_header_alone_or_a_public_key_is_not_a_private_key() -> None:
    assert found("what does -----BEGIN PRIVATE KEY----- mean in a file?") == {}
    public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    assert found(public) == {}


@pytest.mark.parametrize(
    ("text", "detector"),
    [
        (f"aws_access_key_id = {AWS_KEY_ID}", "aws_access_key"),
        ("aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY", "aws_secret_key"),
        (f"OPENAI_API_KEY={OPENAI_KEY}", "api_key"),
        (f"token: {GITHUB_TOKEN}", "api_key"),
        (f"slack {SLACK_TOKEN}", "api_key"),
        (f"the token is {make_jwt({'alg': 'RS256', 'typ': 'JWT'})}", "jwt"),
        ("curl -H 'Authorization: Bearer " + "abc123XYZdef456UVW789" + "'", "bearer_token"),
    ],
)
def test_credentials_are_restricted(text: str, detector: str) -> None:
    assert found(text) == {detector: 1}
    assert data_class(text) == "restricted"


@pytest.mark.parametrize("prefix", ["AKIA", "ASIA", "ABIA", "ACCA", "A3TX", "A3T7"])
def test_every_kind_of_aws_key_id_is_found(prefix: str) -> None:
    # the detector looks only at texts holding one of these prefixes (its gate): each must still be found
    assert found(f"key id {prefix}{'IOSFODNN7EXAMPLE'}, region eu-west-1") == {"aws_access_key": 1}


@pytest.mark.parametrize(
    "text",
    [
        "we use sk-learn-style-hyphenated-names-for-everything here",  # `sk-` but not random
        "a task-management-system-for-everyone-in-the-company",  # `sk-` inside a word
        "AKIA is how AWS key ids start",
        "eyJ" + b64url(b'{"foo": 1}')[3:] + "." + b64url(b'{"bar": 2}') + ".sig",  # no `alg`: not a JWT
        "he was the bearer of good news",
    ],
)
def test_credential_look_alikes_are_not_flagged(text: str) -> None:
    assert found(text) == {}


def test_a_jwt_sent_as_a_bearer_token_counts_once() -> None:
    token = make_jwt({"alg": "HS256"})
    assert found(f"Authorization: Bearer {token}") == {"jwt": 1}


# -- contact details --------------------------------------------------------------------


@pytest.mark.parametrize("email", ["maria.santos@example.com", "a+tag@sub.example.co.uk", "x_y@example.io"])
def test_an_email_address_is_internal(email: str) -> None:
    text = f"write to {email}."
    assert found(text) == {"email": 1}
    assert data_class(text) == "internal"
    assert DEFAULT_CLASSIFIER.redact(text) == "write to [REDACTED:email]."


@pytest.mark.parametrize(
    "text", ["ping @maria about it", "user@localhost", "foo@bar", "a.@example.com", "@example.com"]
)
def test_email_look_alikes_are_not_flagged(text: str) -> None:
    assert found(text) == {}


@pytest.mark.parametrize(
    "phone", ["(617) 253-1000", "617-253-1000", "617.253.1000", "+1 617 253 1000", "+44 20 7946 0958", "+49 30 901820"]
)
def test_a_phone_number_is_internal(phone: str) -> None:
    text = f"call me at {phone} tomorrow"
    assert found(text) == {"phone": 1}
    assert data_class(text) == "internal"
    assert DEFAULT_CLASSIFIER.redact(text) == "call me at [REDACTED:phone] tomorrow"


@pytest.mark.parametrize(
    "text",
    [
        "on 2024-04-12 we meet",
        "the server is 192.168.1.10",
        "extension 555-0100",  # a local number, no area code
        "version 1.2.3.4 of it",
        "1 2 3 4 5 6 7 8 9 0",
        "it costs 1234567 euros",
    ],
)
def test_numbers_that_are_not_phone_numbers(text: str) -> None:
    assert found(text) == {}


def test_a_phone_number_next_to_other_numbers_is_found() -> None:
    text = "Office 617 253 1000 24/7"
    assert DEFAULT_CLASSIFIER.redact(text) == "Office [REDACTED:phone] 24/7"
    assert found("(617) 253-1000 (617) 253-1001") == {"phone": 2}


def test_the_phone_region_decides_how_national_numbers_read() -> None:
    international_only = Classifier(detectors=builtin_detectors(phone_region=None))
    assert found("call (617) 253-1000", international_only) == {}
    assert found("call +1 617 253 1000", international_only) == {"phone": 1}
    british = Classifier(detectors=builtin_detectors(phone_region="GB"))
    assert found("call 020 7946 0958", british) == {"phone": 1}
    assert found("call 020 7946 0958") == {}


def test_an_unknown_phone_region_is_refused() -> None:
    with pytest.raises(ValueError, match="phone region `XX` is not a supported"):
        builtin_detectors(phone_region="XX")


# -- clean text and hostile text --------------------------------------------------------


def test_clean_text_is_public() -> None:
    text = (
        "We are planning a trip to Lisbon from 2024-04-12 to the 20th, two adults and a child of 7. "
        "Our budget is 150 EUR per night; version 2.3 of the app suggested Alfama. See "
        "https://example.org/lisbon?page=3 and call the hotel on arrival. Room 1204, floor 12."
    )
    result = DEFAULT_CLASSIFIER.classify_text(text)
    assert result.data_class == "public"
    assert result.findings == ()


@pytest.mark.parametrize(
    "text",
    [
        "1" * 100_000,
        "1 " * 50_000,
        "12 " * 33_000,
        "12-" * 33_000,
        "(617) 253-1000 " * 3_000,
        "a@" * 50_000,
        "x@a." * 25_000,
        "AB12" * 25_000,
        "DE89 " * 20_000,
        "eyJ" + "a" * 100_000 + ".",
        "-----BEGIN RSA PRIVATE KEY-----" + "x" * 100_000,
        "sk-" + "a" * 100_000,
        "Bearer " * 15_000,
        "+12 345 " * 12_000,
        "1.2.3.4 " * 12_000,
    ],
    ids=lambda text: repr(text[:12]),
)
def test_hostile_input_is_scanned_in_bounded_time(text: str) -> None:
    started = time.process_time()
    DEFAULT_CLASSIFIER.classify_text(text)
    assert time.process_time() - started < 2.0
