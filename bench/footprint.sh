#!/usr/bin/env bash
# Measures what a meshdns sidecar costs, to size the manifests' resource requests and limits:
# resident memory when idle and after a burst of queries, and CPU time per query. It runs
# `meshdns demo` on loopback with a closed upstream port, so nothing leaves the machine.
#
#   bench/footprint.sh [QUERIES] [CLIENTS]   (defaults 5000 and 4; needs dig; builds the
#                                             release binary unless MESHDNS_BIN is set)
set -euo pipefail
cd "$(dirname "$0")/.."

queries="${1:-5000}"
clients="${2:-4}"
port=15453
bin="${MESHDNS_BIN:-target/release/meshdns}"
[ -n "${MESHDNS_BIN:-}" ] || cargo build --release --quiet --bin meshdns

log="$(mktemp)"
batch="$(mktemp)"
cleanup() {
  [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -f "$log" "$batch"
}
trap cleanup EXIT

# 127.0.0.1:5399 has no listener: forwarded names fail fast with ICMP port unreachable.
"$bin" demo --listen "127.0.0.1:$port" --upstream 127.0.0.1:5399 2>"$log" &
pid=$!
for _ in $(seq 100); do
  grep -q "meshdns ready" "$log" && break
  sleep 0.1
done
grep -q "meshdns ready" "$log" || { cat "$log"; echo "meshdns did not become ready" >&2; exit 1; }

rss() { ps -o rss= -p "$pid" | tr -d ' '; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz="$(getconf CLK_TCK)"

echo "idle RSS: $(rss) KiB"
# A mix of every answer rule: local, remote-only, search-path expansion, NXDOMAIN, forwarded.
names=(helloworld.helloworld.svc.cluster.local httpbin.sample.svc.cluster.local
  helloworld.helloworld.sleep.svc.cluster.local nothere.helloworld.svc.cluster.local
  sleep.sleep.svc.cluster.local www.example.test)
for i in $(seq "$queries"); do
  echo "-p $port @127.0.0.1 +tries=1 +time=1 ${names[$((i % ${#names[@]}))]} A"
done >"$batch"
before="$(cpu_ticks)"
start="$(date +%s.%N)"
# Several dig processes at once, so the proxy holds concurrent queries as a busy pod would.
for _ in $(seq "$clients"); do dig -f "$batch" >/dev/null & done
wait $(jobs -p | grep -v "^$pid$")
end="$(date +%s.%N)"
after="$(cpu_ticks)"
echo "after $clients x $queries queries: RSS $(rss) KiB, peak (VmHWM) $(awk '/VmHWM/ {print $2}' "/proc/$pid/status") KiB"
awk -v q="$((queries * clients))" -v t="$((after - before))" -v hz="$hz" -v s="$start" -v e="$end" 'BEGIN {
  printf "CPU: %.1f ms total, %.1f us/query; wall %.2f s (%.0f queries/s, bounded by the dig clients)\n",
    1000 * t / hz, 1e6 * t / hz / q, e - s, q / (e - s) }'
