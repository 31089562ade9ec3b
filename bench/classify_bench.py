"""Micro-benchmark of the classify stage: µs of CPU per request body.

    .venv/bin/python bench/classify_bench.py            # prints a table, writes bench/results/classify.json
    .venv/bin/python bench/classify_bench.py --quick

Bodies (already parsed JSON, as the proxy hands them over):

- `chat_1kb_clean`: a ~1 KB chat request (system prompt, a turn, a question with
  a date, a price, a version and a URL in it), nothing to find;
- `chat_1kb_findings`: the same with an e-mail, a phone number and a card number;
- `chat_100kb_clean`: a ~100 KB request, a long document pasted into one message
  with ordinary numbers (years, section numbers, amounts), nothing to find;
- `chat_100kb_findings`: the same with ten findings spread through it;
- `tool_call_1kb`: an assistant tool call and its result, with a card in the arguments.

Each figure is process CPU time per call (`time.process_time_ns`, so time spent
descheduled on a busy machine does not count): the best and the median of 7
rounds of the mean, one thread. Absolute numbers vary by machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.iso7064 import mod_97_10
from stdnum.us import ssn as stdnum_ssn

from idgate.classify import NUMBER_RUNS, Detector, builtin_detectors, classify, redact, texts_of

RESULTS = Path(__file__).resolve().parent / "results" / "classify.json"

SYSTEM = (
    "You are a helpful travel assistant for Contoso Travel. Answer briefly and in a friendly tone. "
    "Use metric units, prices in euros, and say when information may be out of date. "
    "Never invent opening hours; if unsure, say so and suggest checking the official site."
)
USER = (
    "Hello! We are planning a trip to Lisbon from 2024-04-12 to the 20th, two adults and a child of 7. "
    "Our budget is about 150 EUR per night for a hotel, and we would like to stay somewhere walkable. "
    "Last time (version 2.3 of your app) you suggested Alfama and Baixa, but the hills were hard with "
    "a stroller. Could you suggest three neighbourhoods, a few restaurants that are good with kids, "
    "and whether the 28 tram is worth it? The guide at https://example.org/lisbon/guide?page=3 says "
    "the Oceanarium opens at 10:00 and costs 25 EUR for adults."
)
ASSISTANT = "Happy to help! Before I suggest areas: do you prefer being close to the river or to parks?"
FOLLOW_UP = "Close to the river, please, and somewhere quiet at night."

FINDINGS = " You can reach me at maria.santos@example.com or (617) 253-1000; deposit by card 4111 1111 1111 1111."


def chat(*user_texts: str) -> dict[str, Any]:
    return {
        "model": "demo-chat",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user_texts[0]},
            {"role": "assistant", "content": ASSISTANT},
            *({"role": "user", "content": [{"type": "text", "text": t}]} for t in user_texts[1:]),
        ],
    }


PARAGRAPHS = (
    "Section {n}.2 of the 2023 annual report describes how revenue grew by 14% to 3,240 million, driven by "
    "the services segment. Operating costs rose more slowly, and the margin improved by 1.8 points.",
    "The migration plan moves 42 services in three waves. Each wave has a rollback window of 48 hours, and "
    "the on-call team reviews the dashboards at 09:00 and 17:00 every day of the wave.",
    "In the meeting of March {n}, the committee agreed to review the vendor contracts before Q3. Alice will "
    "collect the terms, Bob will compare the prices, and the decision is expected by the end of the month.",
    "def total(items):\n    return sum(item.price * item.quantity for item in items if item.active)\n"
    "# Called from checkout(); see ticket PROJ-{n} for the rounding issue.",
    "Customers in the pilot rated the new onboarding 4.6 out of 5 on average; 312 of 1,000 invited users "
    "completed it within a week, compared with 187 in the previous version.",
)
SPRINKLED = (
    "Contact: j.doe{n}@example.net.",
    "Phone +44 20 7946 0{n:03d}.",
    "Wire to DE89 3704 0044 0532 0130 00.",
    "SSN 123-45-{n:04d}.",
    "Key AKIA" + "IOSFODNN7EXAMPLE.",  # AWS's documented example id, assembled
)


def document(size: int, sprinkle: int = 0) -> str:
    parts: list[str] = []
    length = 0
    n = 0
    every = max(1, (size // 250) // sprinkle) if sprinkle else 0
    while length < size:
        text = PARAGRAPHS[n % len(PARAGRAPHS)].format(n=n + 1)
        if every and n % every == every // 2 and n // every < sprinkle:
            text += " " + SPRINKLED[(n // every) % len(SPRINKLED)].format(n=n % 900 + 100)
        parts.append(text)
        length += len(text) + 2
        n += 1
    return "\n\n".join(parts)


def bodies() -> dict[str, dict[str, Any]]:
    tool_call = {
        "model": "demo-chat",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Pay the Lisbon hotel deposit with my saved card, please."},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "pay",
                            "arguments": json.dumps({"card": "4111-1111-1111-1111", "amount": 150, "currency": "EUR"}),
                        },
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"status": "ok", "ref": "H-2024-0412"})},
            {"role": "user", "content": USER[:400]},
        ],
    }
    return {
        "chat_1kb_clean": chat(USER, FOLLOW_UP),
        "chat_1kb_findings": chat(USER + FINDINGS, FOLLOW_UP),
        "chat_100kb_clean": chat("Please summarise this document:\n\n" + document(100_000)),
        "chat_100kb_findings": chat("Please summarise this document:\n\n" + document(100_000, sprinkle=10)),
        "tool_call_1kb": tool_call,
    }


def measure(call: Callable[[], object], budget_s: float, rounds: int = 7) -> dict[str, float]:
    """CPU µs per call: the best and the median over `rounds` rounds of the mean, each round
    about `budget_s / rounds` long. Process CPU time, so that time spent descheduled (other
    processes on a shared machine) does not count."""
    call()
    start = time.process_time_ns()
    call()
    once = max(time.process_time_ns() - start, 1000)
    loops = max(1, int(budget_s / rounds * 1e9 / once))
    means = []
    for _ in range(rounds):
        start = time.process_time_ns()
        for _ in range(loops):
            call()
        means.append((time.process_time_ns() - start) / loops / 1000)
    return {"best": round(min(means), 2), "median": round(statistics.median(means), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter rounds")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON results")
    args = parser.parse_args()
    budget = 0.3 if args.quick else 1.5

    rows: list[dict[str, Any]] = []
    for name, body in bodies().items():
        text = "\n".join(texts_of(body))
        found = classify(body)
        rows.append(
            {
                "body": name,
                "text_bytes": len(text.encode()),
                "data_class": found.data_class,
                "findings": {f.detector: f.count for f in found.findings},
                "classify_us": measure(partial(classify, body), budget),
                "texts_of_us": measure(partial(texts_of, body), budget),
                "redact_us": measure(partial(redact, text), budget),
            }
        )

    # Where the time goes on the clean 1 KB request: the shared scan for number runs, then
    # each detector alone (those that run inside number runs are handed them).
    clean = "\n".join(texts_of(bodies()["chat_1kb_clean"]))
    runs = [m.span() for m in NUMBER_RUNS.finditer(clean)]
    per_detector = {"(number runs)": measure(partial(NUMBER_RUNS.findall, clean), budget / 4)["best"]}
    for detector in builtin_detectors():
        regions = runs if detector.within is NUMBER_RUNS else None
        per_detector[detector.name] = measure(partial(_drain, detector, clean, regions), budget / 4)["best"]

    # What one call of each library validator costs: these run on candidates only.
    validators = {
        "stdnum.luhn.is_valid": measure(partial(luhn.is_valid, "4111111111111111"), budget / 4)["best"],
        "stdnum.iso7064.mod_97_10.is_valid": measure(partial(mod_97_10.is_valid, "370400440532013000DE89"), budget / 4)[
            "best"
        ],
        "stdnum.iban.is_valid": measure(
            partial(stdnum_iban.is_valid, "DE89370400440532013000", check_country=False), budget / 4
        )["best"],
        "stdnum.us.ssn.is_valid": measure(partial(stdnum_ssn.is_valid, "536-90-4399"), budget / 4)["best"],
        "phonenumbers.parse+is_valid_number": measure(partial(_phone, "(617) 253-1000"), budget / 4)["best"],
    }

    print("CPU µs per call, best (median) of 7 rounds")
    print(f"{'body':20} {'bytes':>7} {'class':>12} {'classify':>17} {'texts_of':>13} {'redact':>17}  findings")
    for row in rows:
        cells = [f"{row[k]['best']:.1f} ({row[k]['median']:.1f})" for k in ("classify_us", "texts_of_us", "redact_us")]
        print(
            f"{row['body']:20} {row['text_bytes']:>7} {row['data_class']:>12} {cells[0]:>17} {cells[1]:>13} "
            f"{cells[2]:>17}  {row['findings']}"
        )
    print("per detector on chat_1kb_clean (µs):", per_detector)
    print("validators, one call (µs):", validators)

    result = {
        "benchmark": "classify",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "method": "process CPU time per call (process_time_ns), best and median of 7 rounds of the mean, one thread",
        "results": rows,
        "per_detector_1kb_clean_us": per_detector,
        "validator_call_us": validators,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _phone(text: str) -> bool:
    return phonenumbers.is_valid_number(phonenumbers.parse(text, "US"))


def _drain(detector: Detector, text: str, regions: list[tuple[int, int]] | None) -> None:
    for _ in detector.spans(text, regions):
        pass


if __name__ == "__main__":
    main()
