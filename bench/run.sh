#!/usr/bin/env bash
# Compares meshdns with unbound (and dnsmasq for forwarding) under dnsperf, each server pinned
# to one core with one worker thread, and writes a markdown table to bench/results.md.
# Everything runs on loopback: the only upstream any server is given is bench/responder.c on
# 127.0.0.1. See bench/README.md for the scenarios and what each column means.
#
#   bench/run.sh                 3 runs x 10 s per scenario and server (about 10 minutes)
#   QUICK=1 bench/run.sh         2 runs x 2 s (about 2 minutes): proves the setup works
#
# Settings (environment): RUNS, DURATION (s), SERVICES (10000), CLUSTERS (3), NAMESPACES (100),
# SHADOW (1: every remote cluster also holds a copy of every local service), QUERIES (lines
# per query file, 100000), CLIENTS (dnsperf -c, 4), OUTSTANDING (dnsperf -q, 100),
# REBUILD_RATE (dump rewrites per second in scenario 4, 10), SCENARIOS (subset of:
# ceiling table search nxdomain fwd-unique fwd-repeat rebuild), BASE_PORT (25300: ports
# BASE_PORT..BASE_PORT+12 on 127.0.0.1), SERVER_CPU (0), CLIENT_CPU (1), MESHDNS_BIN (skip
# `cargo build`), INSTALL (1: apt-get install what is missing), OUT (bench/out),
# RESULTS (bench/results.md), NICE (-10), MESHDNS_CACHE_ON (YAML line for meshdns's cached instance;
# default: the build's default).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

QUICK="${QUICK:-0}"
if [ "$QUICK" = 1 ]; then
  RUNS="${RUNS:-2}" DURATION="${DURATION:-2}"
else
  RUNS="${RUNS:-3}" DURATION="${DURATION:-10}"
fi
SERVICES="${SERVICES:-10000}"
CLUSTERS="${CLUSTERS:-3}"
NAMESPACES="${NAMESPACES:-100}"
SHADOW="${SHADOW:-1}"
QUERIES="${QUERIES:-100000}"
CLIENTS="${CLIENTS:-4}"
OUTSTANDING="${OUTSTANDING:-100}"
REBUILD_RATE="${REBUILD_RATE:-10}"
SCENARIOS="${SCENARIOS:-ceiling table search nxdomain fwd-unique fwd-repeat rebuild}"
BASE_PORT="${BASE_PORT:-25300}"
SERVER_CPU="${SERVER_CPU:-0}"
CLIENT_CPU="${CLIENT_CPU:-1}"
INSTALL="${INSTALL:-1}"
# Servers, dnsperf and the churn writer run at this niceness, each in a session of its own
# whose autogroup gets the same niceness (with sched_autogroup, a process's nice only counts
# within its session), so other jobs on the machine (a build, a test run) take less of their
# cores; 0 when not root.
NICE="${NICE:--10}"
[ "$(id -u)" = 0 ] || NICE=0
OUT="$(mkdir -p "${OUT:-bench/out}" && cd "${OUT:-bench/out}" && pwd)"
RESULTS="${RESULTS:-$ROOT/bench/results.md}"
MESHDNS_CACHE_ON="${MESHDNS_CACHE_ON:-}"
# Unique names per forwarding run: enough for 80k qps for the whole run (dnsperf -n 1 stops
# at the end of the file rather than repeating a name a cache could answer).
UNIQUE_NAMES="${UNIQUE_NAMES:-$((80000 * DURATION))}"

P_CEILING=$BASE_PORT               # responder.c as the measured server (core SERVER_CPU)
P_UP=$((BASE_PORT + 1))            # responder.c as every server's upstream (core CLIENT_CPU)
P_MESH=$((BASE_PORT + 2))          # meshdns, default cache
P_MESH_ADMIN=$((BASE_PORT + 3))
P_MESH_NC=$((BASE_PORT + 4))       # meshdns, cache off (when the build has `cache:`)
P_MESH_NC_ADMIN=$((BASE_PORT + 5))
P_UNBOUND=$((BASE_PORT + 6))
P_DNSMASQ_NC=$((BASE_PORT + 7))    # dnsmasq --cache-size=0
P_DNSMASQ=$((BASE_PORT + 8))       # dnsmasq, default cache
P_DEMO=$((BASE_PORT + 9))          # meshdns demo, for its idle RSS
P_DEMO_ADMIN=$((BASE_PORT + 10))

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Processes: every server is started through `start` and stopped by its PID on exit.
# ---------------------------------------------------------------------------------------------
declare -A PID=()
PIDFILE="$OUT/pids"
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  for name in "${!PID[@]}"; do stop_pid "${PID[$name]}"; done
  [ -n "${CHURN_PID:-}" ] && stop_pid "$CHURN_PID"
  rm -f "$PIDFILE"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A previous run killed with SIGKILL may have left its servers: stop those (and only those:
# the PIDs it recorded whose command line still names this output directory).
if [ -f "$PIDFILE" ]; then
  while read -r pid; do
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$OUT"; then
      log "stopping pid $pid left by an earlier run"
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done <"$PIDFILE"
  sleep 1
  rm -f "$PIDFILE"
fi

# "${PRIO[@]}" CMD...: CMD in a session of its own, its autogroup and itself at niceness NICE;
# a simple command, so that `... &` gives CMD's own PID. PRIO_WAIT: the same, waited for.
# shellcheck disable=SC2016 # expanded by sh -c
PRIO_SH='echo "$0" >/proc/self/autogroup 2>/dev/null; exec nice -n "$0" "$@"'
PRIO=(setsid sh -c "$PRIO_SH" "$NICE")
PRIO_WAIT=(setsid -w sh -c "$PRIO_SH" "$NICE")

# start NAME CPU LOGFILE CMD...: runs CMD pinned to CPU in the background.
start() {
  local name=$1 cpu=$2 logfile=$3
  shift 3
  "${PRIO[@]}" taskset -c "$cpu" "$@" >"$logfile" 2>&1 &
  PID[$name]=$!
  echo "$!" >>"$PIDFILE"
  sleep 0.05
  [ "$(readlink "/proc/$!/exe" 2>/dev/null)" != "$(command -v setsid)" ] ||
    die "$name: setsid forked; its PID is not the server's"
}
stop() {
  local name=$1
  [ -n "${PID[$name]:-}" ] || return 0
  stop_pid "${PID[$name]}"
  unset "PID[$name]"
}

port_free() { ! ss -Hlnu "sport = :$1" | grep -q . && ! ss -Hlnt "sport = :$1" | grep -q .; }

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
install_missing() {
  local need=()
  command -v dnsperf >/dev/null || need+=(dnsperf)
  command -v unbound >/dev/null || need+=(unbound)
  command -v gcc >/dev/null || need+=(gcc)
  command -v dig >/dev/null || need+=(bind9-dnsutils)
  command -v curl >/dev/null || need+=(curl)
  command -v python3 >/dev/null || need+=(python3)
  command -v ss >/dev/null || need+=(iproute2)
  if [ "${#need[@]}" -gt 0 ]; then
    [ "$INSTALL" = 1 ] || die "missing ${need[*]} (INSTALL=0)"
    log "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  # dnsmasq is optional (a forwarding reference). dnsmasq-base is the binary alone: the
  # `dnsmasq` package would also set up a system service on port 53.
  if ! command -v dnsmasq >/dev/null && [ "$INSTALL" = 1 ]; then
    log "installing dnsmasq-base"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dnsmasq-base >/dev/null ||
      log "dnsmasq could not be installed: its rows are skipped"
  fi
  command -v dnsmasq >/dev/null && HAVE_DNSMASQ=1 || HAVE_DNSMASQ=0
}
install_missing
[ "$(nproc)" -ge 2 ] || die "needs 2 CPUs (server on CPU $SERVER_CPU, dnsperf on CPU $CLIENT_CPU)"

mkdir -p "$OUT/logs"
if [ -n "${MESHDNS_BIN:-}" ]; then
  [ "$(realpath "$MESHDNS_BIN")" = "$OUT/meshdns" ] || cp "$MESHDNS_BIN" "$OUT/meshdns"
else
  log "cargo build --release"
  cargo build --release --quiet --bin meshdns
  # A copy, so a rebuild in the work tree cannot swap the binary in the middle of a run.
  cp target/release/meshdns "$OUT/meshdns"
fi
MESHDNS="$OUT/meshdns"
gcc -O2 -Wall -o "$OUT/responder" bench/responder.c

# ---------------------------------------------------------------------------------------------
# Data: object dumps, unbound local-data, query files (regenerated only when the inputs change)
# ---------------------------------------------------------------------------------------------
gen_args=(--out "$OUT/data" --services "$SERVICES" --clusters "$CLUSTERS" --namespaces "$NAMESPACES"
  --queries "$QUERIES")
[ "$SHADOW" = 1 ] || gen_args+=(--no-shadow)
stamp="$(echo "${gen_args[*]}" | cat - bench/gen.py | sha256sum | cut -c1-16)"
if [ "$(cat "$OUT/data/stamp" 2>/dev/null)" != "$stamp" ]; then
  log "generating $SERVICES services over $CLUSTERS clusters"
  rm -rf "$OUT/data"
  python3 bench/gen.py "${gen_args[@]}"
  echo "$stamp" >"$OUT/data/stamp"
fi
D="$OUT/data"

# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
SEARCH="default.svc.cluster.local svc.cluster.local cluster.local"
printf 'nameserver 127.0.0.1\nsearch %s\noptions ndots:5\n' "$SEARCH" >"$D/resolv.conf"
meshdns_config() { # PORT ADMIN_PORT EXTRA_YAML
  cat <<EOF
# generated by bench/run.sh
listen: ["127.0.0.1:$1"]
upstreams: ["127.0.0.1:$P_UP"]        # responder.c: never this machine's resolver
resolvConf: resolv.conf
search: [default.svc.cluster.local, svc.cluster.local, cluster.local]
workerThreads: 1
admin: "127.0.0.1:$2"
startupWait: 60s
drainTimeout: 0s
clusters:
  - name: cluster-1
    local: true
    objects: dumps/cluster-1.json
EOF
  for c in $(seq 2 "$CLUSTERS"); do
    printf '  - name: cluster-%s\n    objects: dumps/cluster-%s.json\n' "$c" "$c"
  done
  printf '  - name: cluster-%s\n    objects: dumps/churn.json\n' "$((CLUSTERS + 1))"
  [ -z "$3" ] || echo "$3"
}
meshdns_config "$P_MESH" "$P_MESH_ADMIN" "" >"$D/probe.yaml"
"$MESHDNS" check --config "$D/probe.yaml" >"$OUT/logs/check.log" 2>&1 ||
  { cat "$OUT/logs/check.log" >&2; die "meshdns check rejects the generated config"; }
# Is there a forwarding cache to turn off? (`cache: {maxEntries: 0}`; older builds reject it.)
meshdns_config "$P_MESH_NC" "$P_MESH_NC_ADMIN" "cache: {maxEntries: 0}" >"$D/meshdns-nocache.yaml"
if "$MESHDNS" check --config "$D/meshdns-nocache.yaml" >"$OUT/logs/check-cache.log" 2>&1; then
  HAVE_CACHE_KEY=1
else
  grep -qi cache "$OUT/logs/check-cache.log" || { cat "$OUT/logs/check-cache.log" >&2; die "meshdns check failed"; }
  HAVE_CACHE_KEY=0
  log "this meshdns has no \`cache:\` key: one meshdns instance serves both forwarding scenarios"
fi
meshdns_config "$P_MESH" "$P_MESH_ADMIN" "$MESHDNS_CACHE_ON" >"$D/meshdns.yaml"
rm -f "$D/probe.yaml"

cat >"$D/unbound.conf" <<EOF
# generated by bench/run.sh
server:
  username: ""
  chroot: ""
  directory: "$D"
  pidfile: ""
  do-daemonize: no
  use-syslog: no
  logfile: ""
  verbosity: 0
  interface: 127.0.0.1@$P_UNBOUND
  port: $P_UNBOUND
  do-ip6: no
  access-control: 127.0.0.0/8 allow
  num-threads: 1
  module-config: "iterator"
  do-not-query-localhost: no
  # RFC 6761 makes test. a default local zone; the forwarding names live under example.test.
  local-zone: "test." nodefault
$(cat "$D/unbound-local.conf")
remote-control:
  control-enable: no
# Every name unbound does not own goes to responder.c: it never iterates from the root.
forward-zone:
  name: "."
  forward-addr: 127.0.0.1@$P_UP
EOF
unbound-checkconf "$D/unbound.conf" >/dev/null || die "unbound-checkconf rejects $D/unbound.conf"

dnsmasq_args() { # PORT [--cache-size=0]
  # (--dhcp-leasefile is unused without DHCP: it puts OUT in the command line for the
  # leftover check above.)
  echo --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --pid-file= \
    --dhcp-leasefile="$OUT/dnsmasq.leases" \
    --listen-address=127.0.0.1 --bind-interfaces --port="$1" --server="127.0.0.1#$P_UP" "${@:2}"
}

# ---------------------------------------------------------------------------------------------
# Measuring helpers
# ---------------------------------------------------------------------------------------------
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ="$(getconf CLK_TCK)"
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
metrics() { curl -s --max-time 3 "http://127.0.0.1:$1/metrics"; }
# outcome=count pairs of meshdns_requests_total, summed over protocol and qtype
outcomes() { metrics "$1" | awk '/^meshdns_requests_total/ {match($0, /outcome="[^"]*"/);
  o = substr($0, RSTART + 9, RLENGTH - 10); n[o] += $NF} END {for (o in n) printf "%s=%d ", o, n[o]}'; }
rebuilds() { metrics "$1" | awk '/^meshdns_table_rebuilds_total/ {print $NF; f = 1} END {if (!f) print -1}'; }
# seconds spent building tables so far (meshdns_table_rebuild_duration_seconds_sum), or 0
rebuild_seconds() { metrics "$1" | awk '/^meshdns_table_rebuild_duration_seconds_sum/ {s = $NF} END {print s + 0}'; }

wait_dns() { # PORT NAME: until the server answers anything (max 60 s)
  for _ in $(seq 600); do
    dig @127.0.0.1 -p "$1" +tries=1 +time=1 "$2" A >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
wait_ready() { # NAME LOGFILE: meshdns logs "meshdns ready" once it serves (max 120 s)
  for _ in $(seq 1200); do
    grep -q "meshdns ready" "$2" && return 0
    kill -0 "${PID[$1]}" 2>/dev/null || { cat "$2" >&2; die "$1 exited during start-up"; }
    sleep 0.1
  done
  cat "$2" >&2
  die "$1 not ready after 120 s"
}

# check_server LABEL PORT KIND...: asks the names of checks.tsv of each KIND and fails loudly
# on a wrong answer. KINDs: local remote search search-cname nxdomain forward.
check_server() {
  local label=$1 port=$2
  shift 2
  local kind name want got status out
  for want_kind in "$@"; do
    while IFS=$'\t' read -r kind name want; do
      [ "$kind" = "${want_kind%-cname}" ] || continue
      out="$(dig @127.0.0.1 -p "$port" +tries=2 +time=2 "$name" A 2>&1)" || die "$label: dig $name failed: $out"
      status="$(sed -n 's/.*status: \([A-Z]*\),.*/\1/p' <<<"$out")"
      got="$(awk '/^;; ANSWER SECTION/ {a = 1; next} /^$/ {a = 0} a && $4 == "A" {print $5}' <<<"$out" | sort | paste -sd, -)"
      case "$want_kind" in
        nxdomain) [ "$status" = NXDOMAIN ] || die "$label: $name: want NXDOMAIN, got $status" ;;
        search-cname)
          # unbound answers a local-data CNAME alone: the client asks for the target next.
          awk '/ANSWER SECTION/,/^$/' <<<"$out" | grep -qE "CNAME[[:space:]]+${name/.default.svc./.svc.}\.\$" ||
            die "$label: $name: want a CNAME to ${name/.default.svc./.svc.}, got: $out" ;;
        search)
          awk '/ANSWER SECTION/,/^$/' <<<"$out" | grep -qE "CNAME[[:space:]]+${name/.default.svc./.svc.}\.\$" ||
            die "$label: $name: no CNAME to ${name/.default.svc./.svc.} in: $out"
          if [ "$status" != NOERROR ] || [ "$got" != "$want" ]; then die "$label: $name: want $want, got $status ${got:-nothing}"; fi ;;
        *) if [ "$status" != NOERROR ] || [ "$got" != "$want" ]; then die "$label: $name: want $want, got $status ${got:-nothing}"; fi ;;
      esac
    done <"$D/checks.tsv"
  done
  log "$label answers correctly ($*)"
}

RAW="$OUT/raw.tsv"
MEM="$OUT/mem.tsv"
printf 'run\tscenario\tserver\tqps\tcompleted\tsent\tlost\truntime\tcpu_s\trss_kb\tlat_avg\tlat_max\trcodes\tend\tnotes\n' >"$RAW"
printf 'server\tstate\trss_kb\thwm_kb\n' >"$MEM"
mem() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$(rss_kb "$3")" "$(hwm_kb "$3")" >>"$MEM"; }

# measure RUN SCENARIO SERVER PID PORT FILE MAXRUNS [NOTES]: one dnsperf run on CLIENT_CPU.
measure() {
  local run=$1 scen=$2 server=$3 pid=$4 port=$5 file=$6 maxruns=$7 notes=${8:-}
  local logf="$OUT/logs/dnsperf-$scen-$server-$run.log" c0 c1
  kill -0 "$pid" 2>/dev/null || die "$server is not running"
  local admin o0=""
  admin="$(admin_of "$server")"
  [ -z "$admin" ] || o0="$(outcomes "$admin")"
  c0="$(cpu_ticks "$pid")"
  "${PRIO_WAIT[@]}" timeout $((DURATION + 30)) taskset -c "$CLIENT_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$file" \
    -l "$DURATION" -n "$maxruns" -c "$CLIENTS" -q "$OUTSTANDING" >"$logf" 2>&1 ||
    { cat "$logf" >&2; die "dnsperf against $server failed"; }
  c1="$(cpu_ticks "$pid")"
  # meshdns: what the queries of this run were answered with (rule outcomes from /metrics).
  [ -z "$admin" ] || notes="$notes$(outcome_delta "$o0" "$(outcomes "$admin")")"
  awk -v run="$run" -v scen="$scen" -v server="$server" -v hz="$HZ" -v ticks="$((c1 - c0))" \
    -v rss="$(rss_kb "$pid")" -v notes="$notes" '
    /Queries sent:/ {sent = $3}
    /Queries completed:/ {done = $3}
    /Queries lost:/ {lost = $3}
    /Run time \(s\):/ {rt = $4}
    /Queries per second:/ {qps = $4}
    /Average Latency/ {avg = $4; max = $8; sub(/\)/, "", max)}
    /Response codes:/ {sub(/.*Response codes: */, ""); rc = $0}
    /Testing complete/ {end = ($0 ~ /time limit/) ? "time" : "file"}
    END {printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%.3f\t%s\t%s\t%s\t%s\t%s\t%s\n", run, scen, server, qps, done,
      sent, lost, rt, ticks / hz, rss, avg, max, rc, end, notes}' "$logf" >>"$RAW"
  tail -1 "$RAW" | awk -F'\t' '{printf "  run %s %-10s %-14s %8.0f qps  cpu %6.2fs  lost %s  %s\n", $1, $2, $3, $4, $9, $7, $15}' >&2
}

admin_of() {
  case $1 in meshdns) echo "$P_MESH_ADMIN" ;; meshdns-nocache) echo "$P_MESH_NC_ADMIN" ;; esac
}
# outcome_delta BEFORE AFTER: "local=4990 search_shortcut=10" of the queries in between
outcome_delta() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    n = split(a, x, " "); for (i = 1; i <= n; i++) {split(x[i], kv, "="); before[kv[1]] = kv[2]}
    n = split(b, x, " "); for (i = 1; i <= n; i++) {split(x[i], kv, "="); d = kv[2] - before[kv[1]]
      if (d > 0) {out = out sep kv[1] "=" d; sep = " "}}
    print out }'
}
# annotate TEXT: adds TEXT to the notes of the last row of raw.tsv
annotate() {
  awk -F'\t' -v OFS='\t' -v t="$1" -v last="$(wc -l <"$RAW")" \
    'NR == last {$NF = ($NF == "" ? t : $NF " " t)} {print}' "$RAW" >"$RAW.tmp" && mv "$RAW.tmp" "$RAW"
}

unique_file() { # TAG: a fresh file of names no server has seen
  awk -v n="$UNIQUE_NAMES" -v tag="$1" 'BEGIN {for (i = 0; i < n; i++) printf "u%d-%s.example.test A\n", i, tag}' \
    >"$OUT/q-unique.txt"
}

# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------
for p in $(seq "$BASE_PORT" $((BASE_PORT + 10))); do
  port_free "$p" || die "127.0.0.1:$p is in use (set BASE_PORT): $(ss -Hlnup "sport = :$p")"
done
LOADAVG="$(cut -d' ' -f1-3 /proc/loadavg)"
log "load average before: $LOADAVG"

start upstream "$CLIENT_CPU" "$OUT/logs/upstream.log" "$OUT/responder" "$P_UP"
start ceiling "$SERVER_CPU" "$OUT/logs/ceiling.log" "$OUT/responder" "$P_CEILING"
wait_dns "$P_UP" check.example.test || die "responder (upstream) does not answer"
wait_dns "$P_CEILING" check.example.test || die "responder (ceiling) does not answer"
check_server responder "$P_UP" forward
check_server responder-ceiling "$P_CEILING" forward

# 5. RSS of the embedded demo, idle, forwarding to the responder only.
start demo "$SERVER_CPU" "$OUT/logs/demo.log" "$MESHDNS" demo --listen "127.0.0.1:$P_DEMO" \
  --upstream "127.0.0.1:$P_UP" --admin "127.0.0.1:$P_DEMO_ADMIN"
wait_ready demo "$OUT/logs/demo.log"
[ "$(dig @127.0.0.1 -p "$P_DEMO" +short helloworld.helloworld.svc.cluster.local)" = 10.96.120.15 ] ||
  die "meshdns demo answers helloworld wrongly"
sleep 1
mem "meshdns demo" "idle (2 demo clusters)" "${PID[demo]}"
stop demo

t0="$(date +%s.%N)"
start meshdns "$SERVER_CPU" "$OUT/logs/meshdns.log" "$MESHDNS" serve --config "$D/meshdns.yaml"
wait_ready meshdns "$OUT/logs/meshdns.log"
MESH_LOAD_S="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')"
log "meshdns loaded $(cut -d';' -f1 "$D/summary.txt") in ${MESH_LOAD_S}s"
check_server meshdns "$P_MESH" local remote search nxdomain forward
if [ "$HAVE_CACHE_KEY" = 1 ]; then
  start meshdns-nocache "$SERVER_CPU" "$OUT/logs/meshdns-nocache.log" "$MESHDNS" serve --config "$D/meshdns-nocache.yaml"
  wait_ready meshdns-nocache "$OUT/logs/meshdns-nocache.log"
  check_server meshdns-nocache "$P_MESH_NC" local forward
fi

t0="$(date +%s.%N)"
start unbound "$SERVER_CPU" "$OUT/logs/unbound.log" unbound -d -c "$D/unbound.conf"
wait_dns "$P_UNBOUND" check.example.test || { cat "$OUT/logs/unbound.log" >&2; die "unbound does not answer"; }
UNBOUND_LOAD_S="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')"
check_server unbound "$P_UNBOUND" local remote search-cname nxdomain forward

if [ "$HAVE_DNSMASQ" = 1 ]; then
  # shellcheck disable=SC2046
  start dnsmasq-nocache "$SERVER_CPU" "$OUT/logs/dnsmasq-nocache.log" dnsmasq $(dnsmasq_args "$P_DNSMASQ_NC" --cache-size=0)
  # shellcheck disable=SC2046
  start dnsmasq "$SERVER_CPU" "$OUT/logs/dnsmasq.log" dnsmasq $(dnsmasq_args "$P_DNSMASQ")
  wait_dns "$P_DNSMASQ_NC" check.example.test || { cat "$OUT/logs/dnsmasq-nocache.log" >&2; die "dnsmasq does not answer"; }
  wait_dns "$P_DNSMASQ" check.example.test || { cat "$OUT/logs/dnsmasq.log" >&2; die "dnsmasq does not answer"; }
  check_server dnsmasq-nocache "$P_DNSMASQ_NC" forward
  check_server dnsmasq "$P_DNSMASQ" forward
fi
sleep 1
mem meshdns "after loading ($(cut -d';' -f1 "$D/summary.txt" | cut -d' ' -f1) names, $((CLUSTERS + 1)) dumps)" "${PID[meshdns]}"
mem unbound "after loading the same names as local-data" "${PID[unbound]}"

# ---------------------------------------------------------------------------------------------
# Runs: every scenario's servers take turns within a run, so drift hits them alike.
# ---------------------------------------------------------------------------------------------
MESH_FWD_NC=meshdns
[ "$HAVE_CACHE_KEY" = 1 ] && MESH_FWD_NC=meshdns-nocache
port_of() {
  case $1 in
    ceiling) echo "$P_CEILING" ;; meshdns) echo "$P_MESH" ;; meshdns-nocache) echo "$P_MESH_NC" ;;
    unbound) echo "$P_UNBOUND" ;; dnsmasq) echo "$P_DNSMASQ" ;; dnsmasq-nocache) echo "$P_DNSMASQ_NC" ;;
  esac
}
MAXRUNS=1000 # passes through a query file: bounded in count as well as in time
for run in $(seq "$RUNS"); do
  log "run $run of $RUNS (${DURATION}s each)"
  for scen in $SCENARIOS; do
    case $scen in
      ceiling) measure "$run" ceiling responder "${PID[ceiling]}" "$P_CEILING" "$D/q-table.txt" $MAXRUNS ;;
      table | search | nxdomain)
        for s in meshdns unbound; do
          measure "$run" "$scen" "$s" "${PID[$s]}" "$(port_of "$s")" "$D/q-$scen.txt" $MAXRUNS
        done ;;
      fwd-unique)
        servers="$MESH_FWD_NC unbound"
        [ "$HAVE_DNSMASQ" = 1 ] && servers="$servers dnsmasq-nocache"
        for s in $servers; do
          unique_file "$run-$s-$$"
          measure "$run" fwd-unique "$s" "${PID[$s]}" "$(port_of "$s")" "$OUT/q-unique.txt" 1
        done ;;
      fwd-repeat)
        servers="meshdns unbound"
        [ "$HAVE_DNSMASQ" = 1 ] && servers="$servers dnsmasq"
        for s in $servers; do
          measure "$run" fwd-repeat "$s" "${PID[$s]}" "$(port_of "$s")" "$D/q-fwd-repeat.txt" $MAXRUNS
        done ;;
      rebuild)
        r0="$(rebuilds "$P_MESH_ADMIN")" b0="$(rebuild_seconds "$P_MESH_ADMIN")"
        "${PRIO[@]}" taskset -c "$CLIENT_CPU" python3 bench/gen.py --churn --out "$D" --clusters "$CLUSTERS" \
          --rate "$REBUILD_RATE" --seconds "$DURATION" --count $((REBUILD_RATE * DURATION)) \
          >"$OUT/logs/churn.out" 2>&1 &
        CHURN_PID=$!
        measure "$run" rebuild meshdns "${PID[meshdns]}" "$P_MESH" "$D/q-table.txt" $MAXRUNS
        wait "$CHURN_PID" || die "the churn writer failed: $(cat "$OUT/logs/churn.out")"
        CHURN_PID=
        sleep 0.5 # the last rewrite's reload
        r1="$(rebuilds "$P_MESH_ADMIN")" b1="$(rebuild_seconds "$P_MESH_ADMIN")"
        writes="$(cat "$OUT/logs/churn.out")"
        annotate "rewrites=$writes rebuilds=$((r1 - r0)) build_ms=$(awk -v a="$b0" -v b="$b1" 'BEGIN {printf "%d", (b - a) * 1000}')"
        [ "$r0" != -1 ] || log "no meshdns_table_rebuilds_total in /metrics" ;;
      *) die "unknown scenario $scen" ;;
    esac
  done
done

# Outcome counters of meshdns over the whole session (what it answered from where).
MESH_OUTCOMES="$(outcomes "$P_MESH_ADMIN")"
MESH_NC_OUTCOMES=""
[ "$HAVE_CACHE_KEY" = 1 ] && MESH_NC_OUTCOMES="$(outcomes "$P_MESH_NC_ADMIN")"
mem meshdns "after the runs" "${PID[meshdns]}"
[ "$HAVE_CACHE_KEY" = 1 ] && mem meshdns-nocache "after the runs" "${PID[meshdns-nocache]}"
mem unbound "after the runs" "${PID[unbound]}"
if [ "$HAVE_DNSMASQ" = 1 ]; then
  mem dnsmasq "after the runs" "${PID[dnsmasq]}"
  mem dnsmasq-nocache "after the runs" "${PID[dnsmasq-nocache]}"
fi

# Post-run sanity: meshdns must still answer correctly (the churn cluster is gone from nothing).
check_server meshdns "$P_MESH" local remote search nxdomain forward

cat >"$OUT/meta.env" <<EOF
QUICK=$QUICK
RUNS=$RUNS
DURATION=$DURATION
CLIENTS=$CLIENTS
OUTSTANDING=$OUTSTANDING
REBUILD_RATE=$REBUILD_RATE
SERVER_CPU=$SERVER_CPU
CLIENT_CPU=$CLIENT_CPU
LOADAVG_BEFORE=$LOADAVG
LOADAVG_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)
SUMMARY=$(cat "$D/summary.txt")
COMMIT=$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo "+dirty")
DATE=$(date -u +%Y-%m-%dT%H:%MZ)
CPU=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
HAVE_CACHE_KEY=$HAVE_CACHE_KEY
HAVE_DNSMASQ=$HAVE_DNSMASQ
MESH_LOAD_S=$MESH_LOAD_S
UNBOUND_LOAD_S=$UNBOUND_LOAD_S
MESH_OUTCOMES=$MESH_OUTCOMES
MESH_NC_OUTCOMES=$MESH_NC_OUTCOMES
VERSIONS=meshdns $("$MESHDNS" --version | awk '{print $2}'), unbound $(unbound -V | awk 'NR == 1 {print $2}'), dnsmasq $( [ "$HAVE_DNSMASQ" = 1 ] && dnsmasq --version | awk 'NR == 1 {print $3}'), dnsperf $(dnsperf -h 2>&1 | awk '/^Version/ {print $2}')
EOF
python3 bench/report.py "$OUT" >"$RESULTS"
cat "$RESULTS"
log "wrote $RESULTS (raw numbers and logs in $OUT)"
