#!/usr/bin/env python3
"""Turns bench/run.sh's raw.tsv, mem.tsv and meta.env (in the directory given) into the
markdown of bench/results.md: the median of the runs for every scenario and server."""

import csv
import statistics
import sys
from collections import defaultdict

SCENARIOS = {
    "ceiling": "0. ceiling: responder.c, table names",
    "table": "1. table answers (A, half local, half remote)",
    "search": "2a. search-expanded names (`.default.svc.cluster.local`)",
    "nxdomain": "2b. unknown names under svc.cluster.local (NXDOMAIN)",
    "fwd-unique": "3a. forwarding, unique names (cache off / no hits)",
    "fwd-repeat": "3b. forwarding, 100 repeated names (cache on)",
    "rebuild": "4. table answers, dump rewritten {rate}×/s",
}
# The unbound row each meshdns row is compared with, from the same run.
BASELINE = {"rebuild": "table"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main():
    out = sys.argv[1]
    meta = {}
    with open(f"{out}/meta.env") as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("=")
            meta[k] = v
    rows = list(csv.DictReader(open(f"{out}/raw.tsv"), delimiter="\t"))
    mem = list(csv.DictReader(open(f"{out}/mem.tsv"), delimiter="\t"))

    for r in rows:
        r["qps"] = float(r["qps"] or 0)
        r["completed"] = int(r["completed"] or 0)
        r["sent"] = int(r["sent"] or 0)
        r["lost"] = int(r["lost"] or 0)
        r["runtime"] = float(r["runtime"] or 0)
        r["cpu_s"] = float(r["cpu_s"] or 0)
        r["share"] = r["cpu_s"] / r["runtime"] if r["runtime"] else None
        r["qps_core"] = r["completed"] / r["cpu_s"] if r["cpu_s"] > 0 else None
        r["us_q"] = 1e6 * r["cpu_s"] / r["completed"] if r["completed"] else None

    by_run = {(r["run"], r["scenario"], r["server"]): r for r in rows}
    groups = defaultdict(list)
    for r in rows:
        groups[(r["scenario"], r["server"])].append(r)

    rate = meta.get("REBUILD_RATE", "10")
    lines = []
    w = lines.append
    w("# meshdns benchmark results")
    w("")
    w(
        f"`bench/run.sh` ({'QUICK=1, ' if meta.get('QUICK') == '1' else ''}median of {meta['RUNS']} runs × "
        f"{meta['DURATION']} s), {meta['DATE']}, commit {meta['COMMIT']}; {meta['VERSIONS']}."
    )
    w(
        f"Servers pinned to CPU {meta['SERVER_CPU']} (one worker thread each), "
        f"`dnsperf -c {meta['CLIENTS']} -q {meta['OUTSTANDING']}` and the upstream responder on CPU "
        f"{meta['CLIENT_CPU']}; {meta['CPU']}; load average before {meta['LOADAVG_BEFORE']}, "
        f"after {meta['LOADAVG_AFTER']}."
    )
    w(f"Data: {meta['SUMMARY']}")
    try:
        busy = float(meta["LOADAVG_BEFORE"].split()[0]) > 1.0
    except (KeyError, ValueError, IndexError):
        busy = False
    if busy:
        w("")
        w(
            "**The machine was busy (load average above 1 before the runs): other jobs shared both cores, "
            "so qps and latency are low and noisy; CPU µs/query and qps per core are the comparable columns.**"
        )
    w("")
    w(
        "| scenario | server | qps | server CPU | qps per core | CPU µs/query | mean latency ms | "
        "max latency ms | lost / sent | RSS MiB | meshdns ÷ unbound (qps per core) | answers |"
    )
    w("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    order = list(SCENARIOS)
    for (scen, server), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 99)):
        ratio = None
        if server.startswith("meshdns"):
            ratios = []
            for r in rs:
                base = by_run.get((r["run"], BASELINE.get(scen, scen), "unbound"))
                if base and base["qps_core"] and r["qps_core"]:
                    ratios.append(r["qps_core"] / base["qps_core"])
            ratio = median(ratios)
        share = median([r["share"] for r in rs])
        rss = median([int(r["rss_kb"]) for r in rs if r["rss_kb"]])
        notes = []
        last = rs[-1]
        if last["rcodes"]:
            notes.append(last["rcodes"].replace("  ", " ").strip())
        outcome = defaultdict(int)
        extra = defaultdict(int)
        for r in rs:
            for kv in r["notes"].split():
                k, _, v = kv.partition("=")
                if k in ("rewrites", "rebuilds", "build_ms"):
                    extra[k] += int(v)
                elif v.isdigit():
                    outcome[k] += int(v)
        total = sum(outcome.values())
        if total:
            notes.append(
                "outcomes: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(outcome.items(), key=lambda kv: -kv[1]))
            )
        if extra:
            secs = sum(r["runtime"] for r in rs) or 1
            per = extra["build_ms"] / extra["rebuilds"] if extra["rebuilds"] else 0
            notes.append(
                f"{extra['rewrites']} rewrites, {extra['rebuilds']} table rebuilds ({extra['rebuilds'] / secs:.1f}/s, "
                f"{per:.1f} ms each by meshdns_table_rebuild_duration_seconds)"
            )
        if any(r["end"] == "file" for r in rs):
            notes.append("query file exhausted before the time limit")
        title = SCENARIOS.get(scen, scen).format(rate=rate)
        w(
            f"| {title} | {server} | {fmt(median([r['qps'] for r in rs]), ',.0f')} | "
            f"{fmt(share * 100 if share is not None else None, '.0f')}% | "
            f"{fmt(median([r['qps_core'] for r in rs]), ',.0f')} | {fmt(median([r['us_q'] for r in rs]), '.1f')} | "
            f"{fmt(median([float(r['lat_avg']) * 1000 for r in rs if r['lat_avg']]), '.3f')} | "
            f"{fmt(median([float(r['lat_max']) * 1000 for r in rs if r['lat_max']]), '.1f')} | "
            f"{sum(r['lost'] for r in rs)} / {sum(r['sent'] for r in rs)} | "
            f"{fmt(rss / 1024 if rss else None, '.1f')} | {fmt(ratio, '.2f')} | {'; '.join(notes)} |"
        )
    w("")
    w("| server | when | RSS MiB | peak RSS (VmHWM) MiB |")
    w("|---|---|--:|--:|")
    for m in mem:
        w(f"| {m['server']} | {m['state']} | {int(m['rss_kb']) / 1024:.1f} | {int(m['hwm_kb']) / 1024:.1f} |")
    w("")
    w(f"- Start-up to first answer: meshdns {meta['MESH_LOAD_S']} s (parse the dumps, build the table), unbound {meta['UNBOUND_LOAD_S']} s (local-data).")
    if meta.get("HAVE_CACHE_KEY") != "1":
        w("- This meshdns build has no `cache:` key (rejected by `meshdns check`), so no forwarding cache: 3a and 3b ran against the same instance.")
    else:
        w("- 3a ran against a second meshdns instance with `cache: {maxEntries: 0}`; 3b against the default one.")
    if meta.get("HAVE_DNSMASQ") != "1":
        w("- dnsmasq was not available: no dnsmasq rows.")
    w("- unbound answers a search-expanded name with its local-data CNAME alone (it does not chase local CNAMEs); the client then asks for the target, a second round trip that meshdns saves.")
    w(f"- meshdns outcomes over the whole session: {meta['MESH_OUTCOMES']}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
