"""Built-in detectors: a precompiled pattern finds candidates, a validator confirms them.

Detectors run on every request, so each is built to cost little on text that
holds nothing: a *gate* of literal substrings must occur before a pattern runs
at all; the digit detectors run inside the runs of digits that one shared scan
found (`NUMBER_RUNS`); patterns start with a literal or a plain character class,
which the regex engine skips ahead to; and the costly checks (Luhn, ISO 7064
mod 97-10, SSN ranges, libphonenumber) run on candidates only. Patterns are
written so that no input makes them backtrack without bound.

A detector returns spans (start, end) and never keeps the text it matched.

| detector         | finds                                                          | default class  |
| ---------------- | -------------------------------------------------------------- | -------------- |
| `private_key`    | PEM/OpenSSH/PGP private key blocks                             | `restricted`   |
| `aws_access_key` | AWS access key ids (`AKIA…`, `ASIA…`)                          | `restricted`   |
| `aws_secret_key` | a 40-character value assigned to `aws_secret_access_key`       | `restricted`   |
| `api_key`        | provider API keys with a known prefix (`sk-`, `ghp_`, `xoxb-`…) | `restricted`   |
| `jwt`            | JSON Web Tokens (a header that decodes to JSON with `alg`)     | `restricted`   |
| `bearer_token`   | `Bearer <token>` as in an `Authorization` header               | `restricted`   |
| `payment_card`   | 13–19 digit card numbers, plain or grouped, passing Luhn       | `confidential` |
| `iban`           | IBANs passing the country format and the mod-97 check          | `confidential` |
| `us_ssn`         | US SSNs `AAA-GG-SSSS` outside the never-issued ranges          | `confidential` |
| `email`          | e-mail addresses                                               | `internal`     |
| `phone`          | phone numbers valid by libphonenumber's metadata               | `internal`     |
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.iso7064 import mod_97_10
from stdnum.us import ssn as stdnum_ssn

__all__ = [
    "DEFAULT_CLASSES",
    "DEFAULT_PHONE_REGION",
    "NUMBER_RUNS",
    "Confirm",
    "Detector",
    "builtin_detectors",
]

Confirm = Callable[[str, re.Match[str]], tuple[int, int] | None]
"""Given the whole text and a candidate match: the confirmed span (maybe narrowed or widened), or None."""

DEFAULT_PHONE_REGION = "US"

DEFAULT_CLASSES: Mapping[str, str] = {
    "private_key": "restricted",
    "aws_access_key": "restricted",
    "aws_secret_key": "restricted",
    "api_key": "restricted",
    "jwt": "restricted",
    "bearer_token": "restricted",
    "payment_card": "confidential",
    "iban": "confidential",
    "us_ssn": "confidential",
    "email": "internal",
    "phone": "internal",
}


@dataclass(frozen=True, slots=True)
class Detector:
    """One named detector.

    `pattern` finds candidates; `confirm`, when given, accepts, adjusts or
    rejects each one (it sees the whole text, for boundary checks). Two ways to
    skip work on text that cannot hold a match:

    - `gate`: literal substrings of which one must occur before `pattern` runs
      (a substring test costs a fraction of a regex scan);
    - `within`: a regex whose matches enclose every match of `pattern`;
      `pattern` then runs inside those regions only. Detectors that share one
      `within` object (the digit detectors share `NUMBER_RUNS`) share its scan.
    """

    name: str
    pattern: re.Pattern[str]
    confirm: Confirm | None = None
    gate: tuple[str, ...] = ()
    within: re.Pattern[str] | None = None

    def may_match(self, text: str) -> bool:
        """A cheap test: False means the pattern cannot match `text`."""
        if not self.gate:
            return True
        for literal in self.gate:  # noqa: SIM110 - any() over a generator costs more, on every request
            if literal in text:
                return True
        return False

    def spans(
        self,
        text: str,
        regions: Sequence[tuple[int, int]] | None = None,
        taken: Callable[[int, int], int | None] | None = None,
    ) -> Iterator[tuple[int, int]]:
        """Confirmed spans, in text order.

        `regions` are the matches of `within` in `text`, when the caller has them
        already. `taken(start, end)`, when given, tells whether a candidate overlaps
        something already found, and where that ends: the candidate is then skipped
        without being confirmed, and the search goes on from there.
        """
        if not self.may_match(text):
            return
        if self.within is None:
            regions = ((0, len(text)),)
        elif regions is None:
            regions = [m.span() for m in self.within.finditer(text)]
        search = self.pattern.search
        confirm = self.confirm
        for start, end in regions:
            pos = start
            while (match := search(text, pos, end)) is not None:
                pos = match.end()
                if taken is not None:
                    blocked = taken(match.start(), pos)
                    if blocked is not None:
                        pos = blocked
                        continue
                if confirm is None:
                    yield match.span()
                    continue
                span = confirm(text, match)
                if span is not None:
                    yield span
                    # A candidate may reach into the next one ("617-253-1000 617-253-1001"):
                    # go on right after what was found, not after the whole candidate.
                    pos = span[1]


# Runs of digits with the punctuation of card, SSN and phone numbers.
NUMBER_RUNS = re.compile(r"[+(0-9][0-9 ().+-]{5,}[0-9]", re.ASCII)


# --- boundaries ---------------------------------------------------------------------------

_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")


def _word_before(text: str, index: int) -> bool:
    """Whether a word character stands right before `index`. Patterns leave this check to
    their confirm step, so that they can start with a literal or a character class, which
    the regex engine skips ahead to quickly (a leading look-behind or `\\b` disables that).

    The `n` of an escaped newline (`\\n`, likewise `\\r`, `\\t`) is no word character:
    tool-call arguments and tool results are JSON-encoded text."""
    if index == 0 or text[index - 1] not in _WORD:
        return False
    return not (index >= 2 and text[index - 2] == "\\" and text[index - 1] in "nrt")


def _word_after(text: str, index: int) -> bool:
    """Whether a word character stands at `index`, right after a candidate. A pattern run
    inside a region sees the region's end as the end of the text, so its own `\\b` is not enough."""
    return index < len(text) and text[index] in _WORD


def _bounded(check: Callable[[str], bool]) -> Confirm:
    """A confirm step: no word character glued on either side, and `check(matched text)`."""

    def confirm(text: str, match: re.Match[str]) -> tuple[int, int] | None:
        start, end = match.span()
        if _word_before(text, start) or _word_after(text, end) or not check(match.group()):
            return None
        return start, end

    return confirm


def _always(_: str) -> bool:
    return True


# --- credentials --------------------------------------------------------------------------

_PEM_LABEL = r"[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?"
_PRIVATE_KEY = re.compile(
    rf"-----BEGIN {_PEM_LABEL}-----(?P<body>.*?)(?:-----END {_PEM_LABEL}-----|\Z)",
    re.ASCII | re.DOTALL,
)
_KEY_MATERIAL = re.compile(r"[A-Za-z0-9+/=]{40}", re.ASCII)


def _confirm_private_key(text: str, match: re.Match[str]) -> tuple[int, int] | None:
    # A key has material: a run of base64. A header alone (say, quoted in a question) is not a key.
    start, end = match.span("body")
    return match.span() if _KEY_MATERIAL.search(text, start, min(end, start + 400)) else None


# AWS key ids are base32 after a four-character resource prefix.
_AWS_ACCESS_KEY = re.compile(r"A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[A-Z2-7]{16}\b", re.ASCII)
_AWS_ACCESS_KEY_GATE = ("AKIA", "ASIA", "ABIA", "ACCA", "A3T")  # every match starts with one of these
_AWS_SECRET_KEY = re.compile(
    r"(?:aws_?secret_?access_?key|AWS_?SECRET_?ACCESS_?KEY|[Aa]ws[Ss]ecret[Aa]ccess[Kk]ey)"
    r"[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
    re.ASCII,
)

# Keys whose prefix names the issuer. `sk-` alone is a common syllable, so its
# keys must also look random (see `_looks_random`).
_API_KEY = re.compile(
    r"(?:"
    r"sk-[A-Za-z0-9_-]{20,}"  # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-), DeepSeek, ...
    r"|sk_(?:live|test)_[A-Za-z0-9]{16,}|rk_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{36,}"  # GitHub
    r"|github_pat_[A-Za-z0-9_]{40,}"  # GitHub fine-grained
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AIza[A-Za-z0-9_-]{35}"  # Google
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r")\b",
    re.ASCII,
)
# Every key above holds `_` or one of the others: `_` is rare in prose and found by memchr.
_API_KEY_GATE = ("_", "sk-", "xox", "glpat-", "AIza")


def _looks_random(token: str) -> bool:
    """A machine-made secret mixes digits and letters; a hyphenated phrase does not."""
    has_digit = has_upper = has_lower = False
    for char in token:
        if char.isdigit():
            has_digit = True
        elif char.isupper():
            has_upper = True
        elif char.islower():
            has_lower = True
    return has_digit and has_lower and (has_upper or len(token) >= 32)


def _api_key(token: str) -> bool:
    return _looks_random(token[3:]) if token.startswith("sk-") else True


_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*", re.ASCII)


def _jwt(token: str) -> bool:
    """The header must decode to a JSON object naming an algorithm."""
    header = token.partition(".")[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


_BEARER = re.compile(r"[Bb]earer[ \t]+[A-Za-z0-9._~+/-]{20,}=*", re.ASCII)


# --- financial and government identifiers -------------------------------------------------

# Card numbers as people write them: contiguous, 4-4-4-4(-3), or 4-6-5 / 4-6-4
# (Amex, Diners), with one kind of separator. Payment cards start with 2–6.
_CARD = re.compile(
    r"[2-6][0-9]{3}(?:[0-9]{9,15}"
    r"|(?P<s1>[ -])[0-9]{4}(?P=s1)[0-9]{4}(?P=s1)[0-9]{4}(?:(?P=s1)[0-9]{3})?"
    r"|(?P<s2>[ -])[0-9]{6}(?P=s2)[0-9]{4,5})\b",
    re.ASCII,
)
_SEPARATORS = str.maketrans("", "", " -")
_FOUR_DIGITS = re.compile(r"[0-9]{4}", re.ASCII)


def _card_number(digits: str) -> bool:
    """The issuer's prefix and length agree (where the network fixes them), and Luhn holds."""
    length = len(digits)
    two = int(digits[:2])
    if digits[0] == "4":  # Visa
        fits = length in (13, 16, 19)
    elif digits[0] == "2":  # Mastercard 2221-2720
        fits = 2221 <= int(digits[:4]) <= 2720 and length == 16
    elif digits[0] == "3":  # Amex 34/37; JCB 35; Diners 30, 36, 38, 39
        fits = length == 15 if two in (34, 37) else two in (30, 35, 36, 38, 39) and length >= 14
    elif 51 <= two <= 55:  # Mastercard
        fits = length == 16
    else:  # Maestro, Discover, UnionPay, RuPay and others in 5 and 6
        fits = True
    return fits and luhn.is_valid(digits)


def _confirm_card(text: str, match: re.Match[str]) -> tuple[int, int] | None:
    start, end = match.span()
    if _word_before(text, start) or _word_after(text, end):
        return None
    separator = match.group("s1") or match.group("s2")
    # Grouped digits that go on, with the same separator, on either side are a table of
    # numbers, not a card ("1000 8919 2345 6789 1234"); an expiry date after a card is not.
    if separator and (
        (start >= 2 and text[start - 1] == separator and text[start - 2].isdigit())
        or (text[end : end + 1] == separator and _FOUR_DIGITS.match(text, end + 1))
    ):
        return None
    return (start, end) if _card_number(match.group().translate(_SEPARATORS)) else None


# Two letters, two check digits, then the BBAN: compact or in groups of four.
# (`[A-Z][A-Z]`, not `[A-Z]{2}`: the engine skips ahead only to a plain first character class.)
_IBAN = re.compile(r"[A-Z][A-Z][0-9][0-9](?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b", re.ASCII)


def _confirm_iban(text: str, match: re.Match[str]) -> tuple[int, int] | None:
    start = match.start()
    if _word_before(text, start):
        return None
    candidate = match.group()
    # A spaced IBAN may have swallowed the next short word ("... 7034 TEST"): drop trailing groups.
    while True:
        compact = candidate.replace(" ", "")
        # ISO 7064 mod 97-10 first (a few µs), then the country's length and BBAN format.
        # Not the national checks: some look banks up in a registry that goes stale.
        if mod_97_10.is_valid(compact[4:] + compact[:4]) and stdnum_iban.is_valid(compact, check_country=False):
            return start, start + len(candidate)
        cut = candidate.rfind(" ")
        if cut < 15:
            return None
        candidate = candidate[:cut]


_SSN = re.compile(r"[0-9][0-9][0-9](?P<sep>[- ])[0-9]{2}(?P=sep)[0-9]{4}(?![0-9-])", re.ASCII)


def _ssn(number: str) -> bool:
    # stdnum checks area 000/666/9xx, group 00, serial 0000 and the published misused numbers.
    return stdnum_ssn.is_valid(number.replace(" ", "-"))


# --- contact details ----------------------------------------------------------------------

# The part after `@`; the local part is found by looking back from it, which keeps
# the scan to the (rare) `@` characters instead of every letter of the text.
_EMAIL_DOMAIN = re.compile(
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"\.[A-Za-z]{2,63}\b",
    re.ASCII,
)
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


def _confirm_email(text: str, match: re.Match[str]) -> tuple[int, int] | None:
    at = match.start()
    start = at
    floor = max(0, at - 64)
    while start > floor and text[start - 1] in _EMAIL_LOCAL:
        start -= 1
    if start >= 1 and text[start - 1] == "\\" and text[start] in "nrt":  # an escaped newline or tab
        start += 1
    while start < at and text[start] == ".":
        start += 1
    if start == at or text[at - 1] == ".":
        return None
    return start, match.end()


# A run of digits with phone punctuation, at most 24 characters; libphonenumber decides.
_PHONE = re.compile(r"[+(0-9][0-9 ().-]{5,22}[0-9]", re.ASCII)
_GROUP = re.compile(r"[^ ]+")
_NOT_PHONE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{2}[./-][0-9]{2}[./-][0-9]{4}"  # dates
    r"|[0-9]{1,3}(?:\.[0-9]{1,3}){3}",  # IPv4 addresses
    re.ASCII,
)
_MAX_PHONE_GROUPS = 6
_PUNCTUATION = str.maketrans("", "", " ().+-")


class _PhoneCheck:
    """Is a candidate a valid phone number? Cheap tests first: libphonenumber's parse and
    validation cost tens of µs, so only candidates of a plausible shape and length reach it."""

    __slots__ = ("_national", "_pattern", "_prefix", "_region")

    def __init__(self, region: str | None) -> None:
        self._region = region
        self._national: frozenset[int] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        self._prefix = ""
        if region is None:
            return
        metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
        desc = metadata.general_desc if metadata is not None else None
        if metadata is None or desc is None or not desc.possible_length:
            self._national = frozenset(range(4, 18))
            return
        self._prefix = metadata.national_prefix or ""
        self._national = frozenset(n + extra for n in desc.possible_length for extra in {0, len(self._prefix)})
        # The region's whole-number pattern is a sound pre-test only where the national prefix
        # is a plain digit string (not so in, say, Brazil or Japan).
        simple = (metadata.national_prefix_for_parsing or self._prefix) == self._prefix
        if simple and desc.national_number_pattern:
            self._pattern = re.compile(desc.national_number_pattern, re.ASCII)

    @property
    def fewest_digits(self) -> int:
        """No phone number as written has fewer digits."""
        return min(self._national, default=7)

    def length_ok(self, digits: int, international: bool) -> bool:
        """Whether a number of `digits` digits can be a phone number (the first, cheapest test)."""
        return 7 <= digits <= 15 if international else digits in self._national

    def __call__(self, candidate: str) -> bool:
        digits = candidate.translate(_PUNCTUATION)
        international = candidate.startswith("+")
        if not self.length_ok(len(digits), international):
            return False
        if not international:
            if self._region is None or _NOT_PHONE.fullmatch(candidate):
                return False
            if self._pattern is not None:
                national = digits
                if (
                    self._prefix
                    and len(digits) - len(self._prefix) in self._national
                    and digits.startswith(self._prefix)
                ):
                    national = digits[len(self._prefix) :]
                if not self._pattern.fullmatch(national):
                    return False
        try:
            number = phonenumbers.parse(candidate, self._region)
        except phonenumbers.NumberParseException:
            return False
        return phonenumbers.is_valid_number(number)


def _phone_confirm(region: str | None) -> Confirm:
    check = _PhoneCheck(region)
    fewest = check.fewest_digits

    def confirm(text: str, match: re.Match[str]) -> tuple[int, int] | None:
        # The candidate may hold a phone number between other numbers ("in 2023 617 253 1000 24/7"):
        # try runs of its space-separated groups, earliest start and longest first. A one-digit
        # group is a country code or trunk prefix, so it can only come first.
        start = match.start()
        candidate = match.group()
        if len(candidate.translate(_PUNCTUATION)) < (7 if "+" in candidate else fewest):
            return None
        groups = [g.span() for g in _GROUP.finditer(candidate)]
        counts = [len(candidate[a:b].translate(_PUNCTUATION)) for a, b in groups]
        for i, (first, _) in enumerate(groups):
            if candidate[first] not in "+(0123456789" or (i == 0 and _word_before(text, start)):
                continue
            ends: list[tuple[int, int]] = []
            digits = 0
            for j in range(i, min(len(groups), i + _MAX_PHONE_GROUPS)):
                if j > i and groups[j][1] - groups[j][0] == 1:
                    break
                digits += counts[j]
                if digits > 15:
                    break
                if digits >= 7:
                    ends.append((j, digits))
            international = candidate[first] == "+"
            for j, digits in reversed(ends):
                last = groups[j][1]
                if not candidate[last - 1].isdigit() or not check.length_ok(digits, international):
                    continue
                if j == len(groups) - 1 and _word_after(text, start + last):
                    continue
                if check(candidate[first:last]):
                    return start + first, start + last
        return None

    return confirm


def builtin_detectors(phone_region: str | None = DEFAULT_PHONE_REGION) -> tuple[Detector, ...]:
    """The built-in detectors. `phone_region` is the region national numbers are read in
    (ISO 3166 alpha-2); None accepts only international `+…` numbers."""
    if phone_region is not None and phone_region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"phone region `{phone_region}` is not a supported ISO 3166 region code, such as `US`")
    return (
        Detector("private_key", _PRIVATE_KEY, _confirm_private_key, gate=("PRIVATE KEY",)),
        Detector("aws_access_key", _AWS_ACCESS_KEY, _bounded(_always), gate=_AWS_ACCESS_KEY_GATE),
        Detector("aws_secret_key", _AWS_SECRET_KEY, gate=("ecret", "ECRET")),
        Detector("api_key", _API_KEY, _bounded(_api_key), gate=_API_KEY_GATE),
        Detector("jwt", _JWT, _bounded(_jwt), gate=("eyJ",)),
        Detector("bearer_token", _BEARER, _bounded(_always), gate=("earer",)),
        Detector("payment_card", _CARD, _confirm_card, within=NUMBER_RUNS),
        Detector("iban", _IBAN, _confirm_iban),
        Detector("us_ssn", _SSN, _bounded(_ssn), within=NUMBER_RUNS),
        Detector("email", _EMAIL_DOMAIN, _confirm_email, gate=("@",)),
        Detector("phone", _PHONE, _phone_confirm(phone_region), within=NUMBER_RUNS),
    )
