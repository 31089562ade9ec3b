"""Micro-benchmark of the policy decision point: 20 policies, 10,000 entitlements.

    .venv/bin/python bench/policy_bench.py             # ~1 minute
    .venv/bin/python bench/policy_bench.py --quick

Builds entity data with 2,000 nested groups, 1,000 declared people, 50 agents,
200 models, 300 tools and 10,000 grants (group → model or tool), and the demo
policy plus nine more rules (20 policies). Most calls ask for something the
caller's token groups are granted, so about half are allowed. Then times `CedarAuthorizer.authorize` one call
at a time: with every cache off and every call distinct; with the entity-slice
cache on a working set of 500 calls; and with the decision cache warm. Direct
calls and calls an agent makes for a human (two Cedar evaluations), reporting CPU time per decision (the thread's own;
other load on the machine does not inflate it) and wall time. For comparison it also times the approach the slices
replace: the whole graph parsed once into a Cedar handle, plus the principal
added per call with `with_added_json_str`. Prints a table and writes
bench/results/policy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cedarpy

from idgate.identity.principal import Actor, Caller, Credential, Principal
from idgate.policy import CedarAuthorizer, EntityData, PolicyStore, Resource
from idgate.policy.demo import POLICY
from idgate.policy.request import RequestBuilder

RESULTS = Path(__file__).parent / "results" / "policy.json"
GROUPS, PEOPLE, MODELS, TOOLS, GRANTS, TENANTS = 2_000, 1_000, 200, 300, 10_000, 10

EXTRA_POLICIES = """
@id("mtls-for-restricted") @reason("scope")
forbid (principal, action == Action::"invoke_model", resource)
when { context.data_class_rank >= 3 && context.binding == "bearer" };

@id("services-stay-internal") @reason("kind")
forbid (principal is Service, action == Action::"invoke_model", resource)
when { resource.location == "external" };

@id("write-tools-need-task") @reason("tool")
forbid (principal, action == Action::"call_tool", resource)
when { resource.action_class == "write" && !context.has_task };

@id("quarantine") @reason("scope")
forbid (principal in Group::"quarantine", action, resource);

@id("admins-exchange")
permit (principal in Role::"admin", action == Action::"exchange_token", resource);

@id("agents-write-bound") @reason("tool")
forbid (principal is Agent, action == Action::"call_tool", resource)
when { resource.action_class == "write" && context.binding == "bearer" };

@id("no-dev-credentials-external") @reason("scope")
forbid (principal, action == Action::"invoke_model", resource)
when { context.credential_kind == "dev" && resource.location == "external" };

@id("tenant-admin-tools")
permit (principal in Role::"tenant-admin", action == Action::"call_tool", resource)
when { resource.tenant == principal.tenant };

@id("short-chains-for-tools") @reason("delegation")
forbid (principal, action == Action::"call_tool", resource)
when { context.depth > 2 };
"""


def entity_data(rng: random.Random) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The entity data, and each granted group's targets (`m:MODEL`, `t:SERVER/TOOL`)."""
    groups = [
        {"name": f"g{i}", "groups": [f"g{i // 10}"] if i >= 10 else [], "roles": ["admin"] if i == 7 else []}
        for i in range(GROUPS)
    ]
    tenants = [f"t{i}" for i in range(TENANTS)]
    models = [
        {
            "name": f"m{i}",
            "provider": "p",
            "location": "external" if i % 4 == 0 else "internal",
            "tenant": "*" if i % 2 else tenants[i % TENANTS],
            "max_data_class": ("internal", "confidential", "restricted")[i % 3],
        }
        for i in range(MODELS)
    ]
    tools = [
        {"server": f"s{i // 10}", "name": f"tool{i}", "action": ("read", "write")[i % 2], "tenant": "*"}
        for i in range(TOOLS)
    ]
    # Agents (group `agents`) may use every model and tool: 500 grants; the rest are random.
    grants: dict[int, set[str]] = {}
    pairs = MODELS + TOOLS
    while pairs < GRANTS:
        group, n = rng.randrange(GROUPS), rng.randrange(MODELS + TOOLS)
        target = f"m:m{n}" if n < MODELS else f"t:{tools[n - MODELS]['server']}/tool{n - MODELS}"
        if target not in grants.setdefault(group, set()):
            grants[group].add(target)
            pairs += 1
    entitlements = [
        {
            "group": f"g{g}",
            "models": sorted(t[2:] for t in targets if t.startswith("m:")),
            "tools": sorted(t[2:] for t in targets if t.startswith("t:")),
        }
        for g, targets in sorted(grants.items())
    ]
    entitlements.append(
        {
            "group": "agents",
            "models": [m["name"] for m in models],
            "tools": [f"{t['server']}/{t['name']}" for t in tools],
        }
    )
    members = [
        {"principal": f"Human::u{i}", "groups": [f"g{rng.randrange(GROUPS)}" for _ in range(3)]} for i in range(PEOPLE)
    ]
    members += [
        {"principal": f"Agent::agent{i}", "groups": ["agents"], "roles": ["billing-agent"] if i == 0 else []}
        for i in range(50)
    ]
    data = {"groups": groups, "members": members, "models": models, "tools": tools, "entitlements": entitlements}
    return data, {f"g{g}": sorted(targets) for g, targets in grants.items()}


Call = tuple[Caller, str, Resource, dict[str, str]]


def workload(rng: random.Random, n: int, delegated: bool, grants: dict[str, list[str]]) -> list[Call]:
    """Calls of random people; most ask for something one of their token's groups is granted."""
    granted = sorted(grants)
    calls = []
    for _ in range(n):
        person = rng.randrange(PEOPLE)
        groups = (rng.choice(granted), f"g{rng.randrange(GROUPS)}")
        subject = Principal("human", f"u{person}", f"t{person % TENANTS}", "bench", groups)
        credential = Credential("jwt", "j", "bench", 0.0, "dpop", "task-1" if delegated else None)
        actors = (Actor(f"agent{rng.randrange(50)}"),) if delegated else ()
        if rng.random() < 0.8:
            target = rng.choice(grants[groups[0]])
        else:
            i = rng.randrange(MODELS + TOOLS)
            target = f"m:m{i}" if i < MODELS else f"t:s{(i - MODELS) // 10}/tool{i - MODELS}"
        kind, name = target.split(":", 1)
        resource = Resource("model" if kind == "m" else "tool", name)
        action = "invoke_model" if kind == "m" else "call_tool"
        context = {"data_class": rng.choice(("public", "internal"))}
        calls.append((Caller(subject, credential, actors), action, resource, context))
    return calls


def timed(fn: Callable[[], object], calls: int) -> tuple[list[float], list[float]]:
    """CPU time (this thread) and wall time of each call, in µs."""
    cpu, wall = [], []
    for _ in range(calls):
        start_cpu, start_wall = time.thread_time_ns(), time.perf_counter_ns()
        fn()
        wall.append((time.perf_counter_ns() - start_wall) / 1_000)
        cpu.append((time.thread_time_ns() - start_cpu) / 1_000)
    return cpu, wall


def summary(samples: tuple[list[float], list[float]]) -> dict[str, float]:
    cpu, wall = sorted(samples[0]), sorted(samples[1])

    def pct(ordered: list[float], q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], 1)

    return {
        "n": len(cpu),
        "p50_us": pct(cpu, 0.5),
        "p99_us": pct(cpu, 0.99),
        "mean_us": round(statistics.fmean(cpu), 1),
        "wall_p50_us": pct(wall, 0.5),
        "wall_p99_us": pct(wall, 0.99),
    }


def busy_seconds() -> tuple[float, float]:
    """The machine's busy CPU seconds (all cores) and this process's, to tell how noisy a run was."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(fields[:8]) - idle) / tick, own.user + own.system


def run_decisions(authorizer: CedarAuthorizer, calls: list[Call], rounds: int = 5) -> dict[str, Any]:
    """Decide every call, in `rounds` slices; besides the totals, the quietest round's p50."""
    it = iter(calls * 2)
    allowed = 0

    def one() -> None:
        nonlocal allowed
        caller, action, resource, context = next(it)
        allowed += authorizer.authorize(caller, action, resource, context).allowed

    cpu: list[float] = []
    wall: list[float] = []
    round_p50s = []
    machine_before, own_before = busy_seconds()
    for _ in range(rounds):
        round_cpu, round_wall = timed(one, len(calls) // rounds)
        cpu += round_cpu
        wall += round_wall
        round_p50s.append(summary((round_cpu, round_wall))["p50_us"])
    machine_after, own_after = busy_seconds()
    errors = sum(bool(authorizer.authorize(*c).errors) for c in calls[:200])
    return {
        **summary((cpu, wall)),
        "quietest_round_p50_us": min(round_p50s),
        "round_p50s_us": round_p50s,
        "other_cpu_seconds": round((machine_after - machine_before) - (own_after - own_before), 2),
        "own_cpu_seconds": round(own_after - own_before, 2),
        "allowed_share": round(allowed / len(cpu), 2),
        "errors_in_200": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    args = parser.parse_args()
    n = 2_000 if args.quick else 10_000
    load = Path("/proc/loadavg").read_text().split()[0]
    rng = random.Random(7)
    raw, grants = entity_data(rng)
    data = EntityData.model_validate(raw)
    with tempfile.TemporaryDirectory() as tmp:
        policy_file = Path(tmp) / "policy.cedar"
        policy_file.write_text(POLICY.read_text() + EXTRA_POLICIES)
        start = time.perf_counter()
        store = PolicyStore([policy_file], entities=data)
        load_ms = (time.perf_counter() - start) * 1_000
    policies = len(store.snapshot.policies.info)
    grant_count = sum(len(e.models) + len(e.tools) for e in data.entitlements)
    direct = workload(rng, n, False, grants)
    delegated = workload(rng, n, True, grants)
    hot_direct = workload(rng, 500, False, grants) * (n // 500)
    hot_delegated = workload(rng, 500, True, grants) * (n // 500)
    warm_up = workload(rng, 1_000, False, grants)
    results: dict[str, Any] = {}
    for kind, calls in (("direct", direct), ("agent for human", delegated)):
        authorizer = CedarAuthorizer(store, cache_size=0, entity_cache_size=0)
        run_decisions(authorizer, warm_up)  # other calls: resources get parsed, once per snapshot
        results[f"no cache, {kind} (every call distinct)"] = run_decisions(authorizer, calls)
    for kind, calls in (("direct", hot_direct), ("agent for human", hot_delegated)):
        authorizer = CedarAuthorizer(store, cache_size=0, entity_cache_size=1_024)
        run_decisions(authorizer, calls[:500])
        results[f"entity-slice cache, no decision cache, {kind} (500 distinct)"] = run_decisions(authorizer, calls)
    cached = CedarAuthorizer(store, cache_size=10_000)
    run_decisions(cached, hot_direct[:500])
    results["decision cache warm, direct (500 distinct)"] = run_decisions(cached, hot_direct)

    # The approach the slices replace: whole graph in one handle, principal added per call.
    snapshot = store.snapshot
    base = cedarpy.Entities.from_json_str(json.dumps(snapshot.graph.to_cedar_json()))
    principal = json.dumps(
        [
            {
                "uid": {"type": "Human", "id": "bench-x"},
                "attrs": {"tenant": "t1"},
                "parents": [{"type": "Group", "id": "g5"}],
            }
        ]
    )
    request = {
        "principal": {"type": "Human", "id": "bench-x"},
        "action": {"type": "Action", "id": "invoke_model"},
        "resource": {"type": "Model", "id": "m1"},
        "context": {},
    }

    def whole_graph() -> None:
        cedarpy.is_authorized(request, snapshot.policies.policy_set, base.with_added_json_str(principal))

    results["alternative: whole graph + with_added_json_str"] = summary(timed(whole_graph, 100 if args.quick else 300))

    # The floor: the Cedar call alone, one realistic request repeated (the 20 policies, full context).
    caller, action, resource, context = direct[0]
    facts = snapshot.graph.resource(resource.kind, resource.id)
    assert facts is not None
    one = RequestBuilder(snapshot, 0).build(caller, action, facts, context["data_class"], declared=True)
    policies_for = snapshot.policies.by_action[action]

    def engine_only() -> None:
        cedarpy.is_authorized_batch(one.requests, policies_for, one.entities)

    timed(engine_only, 500)
    results["reference: cedarpy.is_authorized_batch alone, one request"] = summary(timed(engine_only, n))

    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "cedarpy": getattr(cedarpy, "__version__", "4.12.x"),
        "setup": {
            "policies": policies,
            "entitlements": grant_count,
            "groups": GROUPS,
            "people": PEOPLE,
            "models": MODELS,
            "tools": TOOLS,
            "cedar_entities_in_whole_graph": len(base),
            "store_load_ms": round(load_ms, 1),
        },
        "decisions": results,
        "load_average_at_start": float(load),
        "target": "p50 < 100 us with no cache, direct",
        "note": "p50/p99/mean are CPU time of the deciding thread (robust to other load); wall_* include preemption",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{policies} policies, {grant_count} entitlements, {len(base)} Cedar entities; store loads in {load_ms:.0f} ms"
    )
    print(f"load average at start: {load}")
    head = f"{'CPU µs per decision':66} {'p50':>7} {'p99':>7} {'mean':>7} {'quiet':>7} {'wall50':>7} {'wall99':>7}"
    print(head)
    for label, row in results.items():
        quiet = row.get("quietest_round_p50_us", float("nan"))
        print(
            f"{label:66} {row['p50_us']:7.1f} {row['p99_us']:7.1f} {row['mean_us']:7.1f} {quiet:7.1f}"
            f" {row['wall_p50_us']:7.1f} {row['wall_p99_us']:7.1f}"
        )
    print("quiet: p50 of the quietest of 5 rounds; other CPU used during each run is in the JSON")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
