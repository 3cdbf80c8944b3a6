#!/usr/bin/env python3
"""Generates the data of bench/run.sh: object dumps for meshdns, the matching unbound
local-data, dnsperf query files and the names `dig` checks before each benchmark.

The name space is SERVICES names `svc-<i>.ns-<i % NAMESPACES>`. Even i: a ClusterIP Service
in cluster-1 (the local cluster), so meshdns answers its ClusterIP. Odd i: remote-only, a
Service in one remote cluster (cluster-2 .. cluster-M, round robin), and every fifth of them
in every remote cluster, so meshdns answers the east-west gateway address of each cluster that
has it. With --shadow (the default) every remote cluster also holds a copy of every local
name (the same app deployed everywhere; the local copy wins), so a remote dump is about as
large as a real cluster's. Every remote cluster has `istio-system/istio-eastwestgateway`
(label istio=eastwestgateway) reporting 198.51.100.<cluster number>. Nothing here is ever
contacted: these addresses are only data in answers.

Output (in --out): dumps/cluster-<k>.json (kind: List, JSON parses fastest in meshdns),
dumps/churn.json (the small extra cluster that scenario 4 rewrites), unbound-local.conf,
q-table.txt, q-search.txt, q-nxdomain.txt, q-fwd-repeat.txt, checks.tsv, summary.txt.
`--churn GEN` only rewrites dumps/churn.json (atomically), for the rebuild scenario.
"""

import argparse
import json
import os
import random
import sys
import time

ZONE = "svc.cluster.local"


def cluster_ip(cluster, i):
    # cluster-1: 10.96.0.0/12, cluster-2: 10.112.0.0/12, ...
    base = 96 + 16 * (cluster - 1)
    i += 10  # no .0 addresses
    return f"10.{base + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def gateway_ip(cluster):
    return f"198.51.100.{cluster}"


def service(name, ns, ip, labels=None, lb_ip=None):
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {
            "type": "LoadBalancer" if lb_ip else "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]} if lb_ip else {}},
    }
    return svc


def gateway(cluster):
    return service(
        "istio-eastwestgateway",
        "istio-system",
        cluster_ip(cluster, 65000),
        labels={"app": "istio-eastwestgateway", "istio": "eastwestgateway"},
        lb_ip=gateway_ip(cluster),
    )


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def dump(items):
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})


def churn_dump(cluster, services, gen):
    items = [gateway(cluster)]
    for k in range(services):
        # A different ClusterIP each generation: the dump's state really changes.
        items.append(service(f"churn-{k}", "churn", cluster_ip(cluster, (gen * services + k) % 60000)))
    return dump(items)


def churn(args):
    """Rewrites the churn dump RATE times a second, at most COUNT times (bounded in count and
    time), by atomic rename, so meshdns reloads it and rebuilds its table."""
    path = os.path.join(args.out, "dumps", "churn.json")
    interval = 1.0 / args.rate
    start = time.monotonic()
    deadline = start + args.seconds
    gen = 0
    while gen < args.count and time.monotonic() < deadline:
        gen += 1
        write_atomic(path, churn_dump(args.clusters + 1, args.churn_services, gen))
        next_at = start + gen * interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(gen)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--services", type=int, default=10000)
    p.add_argument("--clusters", type=int, default=3)
    p.add_argument("--namespaces", type=int, default=100)
    p.add_argument("--no-shadow", dest="shadow", action="store_false")
    p.add_argument("--queries", type=int, default=100000, help="lines per query file")
    p.add_argument("--repeat-names", type=int, default=100, help="distinct names of the cached forwarding file")
    p.add_argument("--churn-services", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--churn", action="store_true", help="rewrite dumps/churn.json RATE/s for SECONDS")
    p.add_argument("--rate", type=float, default=10)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--count", type=int, default=100000)
    args = p.parse_args()
    if args.churn:
        return churn(args)
    if args.clusters < 2:
        sys.exit("gen.py: --clusters must be at least 2 (one local, one or more remote)")
    if args.services < 4:
        sys.exit("gen.py: --services must be at least 4")

    rng = random.Random(args.seed)
    out = args.out
    os.makedirs(os.path.join(out, "dumps"), exist_ok=True)
    remotes = list(range(2, args.clusters + 1))
    per_cluster = {c: [] for c in range(1, args.clusters + 1)}
    answers = {}  # name -> sorted list of addresses meshdns (and unbound) must answer
    local_names, remote_names = [], []
    for i in range(args.services):
        name, ns = f"svc-{i}", f"ns-{i % args.namespaces}"
        fqdn = f"{name}.{ns}.{ZONE}"
        if i % 2 == 0:
            per_cluster[1].append(service(name, ns, cluster_ip(1, i)))
            answers[fqdn] = [cluster_ip(1, i)]
            local_names.append(fqdn)
            if args.shadow:
                for c in remotes:
                    per_cluster[c].append(service(name, ns, cluster_ip(c, i)))
        else:
            k = i // 2
            homes = remotes if k % 5 == 0 else [remotes[k % len(remotes)]]
            for c in homes:
                per_cluster[c].append(service(name, ns, cluster_ip(c, i)))
            answers[fqdn] = sorted(gateway_ip(c) for c in homes)
            remote_names.append(fqdn)
    # The gateway Service is itself a remote-only name, answered by every gateway.
    answers[f"istio-eastwestgateway.istio-system.{ZONE}"] = sorted(gateway_ip(c) for c in remotes)
    for c in remotes:
        per_cluster[c].append(gateway(c))
    for c, items in per_cluster.items():
        write_atomic(os.path.join(out, "dumps", f"cluster-{c}.json"), dump(items))
    write_atomic(os.path.join(out, "dumps", "churn.json"), churn_dump(args.clusters + 1, args.churn_services, 0))

    # unbound: the same names and addresses as local-data in a static zone (NXDOMAIN with
    # the same SOA as meshdns for every other name), plus the search-expanded names as
    # CNAMEs to the canonical name (unbound answers those with the CNAME alone).
    lines = [
        'local-zone: "cluster.local." static',
        'local-data: "cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 2 7200 1800 86400 5"',
    ]
    for fqdn, addrs in answers.items():
        for a in addrs:
            lines.append(f'local-data: "{fqdn}. 30 IN A {a}"')
        short = fqdn[: -len(ZONE) - 1]
        lines.append(f'local-data: "{short}.default.{ZONE}. 30 IN CNAME {fqdn}."')
    write_atomic(os.path.join(out, "unbound-local.conf"), "\n".join("  " + l for l in lines) + "\n")

    # Query files: uniform over all names (so half local, half remote-only), A queries.
    names = local_names + remote_names
    table = [rng.choice(names) for _ in range(args.queries)]
    write_atomic(os.path.join(out, "q-table.txt"), "".join(f"{n} A\n" for n in table))
    search = [n[: -len(ZONE) - 1] + ".default." + ZONE for n in table]
    write_atomic(os.path.join(out, "q-search.txt"), "".join(f"{n} A\n" for n in search))
    nx = [f"nothere-{rng.randrange(10**9)}.ns-{rng.randrange(args.namespaces)}.{ZONE}" for _ in range(args.queries)]
    write_atomic(os.path.join(out, "q-nxdomain.txt"), "".join(f"{n} A\n" for n in nx))
    repeat = [f"r-{k}.example.test" for k in range(args.repeat_names)]
    write_atomic(
        os.path.join(out, "q-fwd-repeat.txt"),
        "".join(f"{rng.choice(repeat)} A\n" for _ in range(args.queries)),
    )

    # Names `dig` checks on every server before it is measured: kind, name, expected answer.
    checks = [
        ("local", local_names[0], answers[local_names[0]]),
        ("local", local_names[-1], answers[local_names[-1]]),
        ("remote", remote_names[0], answers[remote_names[0]]),  # k = 0: every remote cluster
        ("remote", remote_names[1], answers[remote_names[1]]),
        ("remote", remote_names[-1], answers[remote_names[-1]]),
        ("search", search[0], answers[table[0]]),
        ("nxdomain", nx[0], []),
        ("forward", "check-1.example.test", ["192.0.2.53"]),
    ]
    with open(os.path.join(out, "checks.tsv"), "w") as f:
        for kind, name, addrs in checks:
            f.write(f"{kind}\t{name}\t{','.join(addrs) or '-'}\n")
    counts = ", ".join(f"cluster-{c}: {len(items)}" for c, items in per_cluster.items())
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(
            f"{args.services} names ({len(local_names)} local, {len(remote_names)} remote-only) in "
            f"{args.namespaces} namespaces; Services per dump: {counts}, "
            f"churn cluster-{args.clusters + 1}: {args.churn_services + 1}\n"
        )


if __name__ == "__main__":
    main()
