#!/usr/bin/env bash
# bench/run.sh — physarum's two-hop proxy path against direct access and against
# nginx (two hops), measured side by side in one run on this machine.
#
#   bench/run.sh                      # build, install what is missing, measure, report
#   BENCH_DURATION=10 BENCH_ROUNDS=3 BENCH_COLD_REPS=5 bench/run.sh
#
# Everything runs on 127.0.0.1 with ports picked at run time. Every process this
# script starts is stopped on exit (also on failure or Ctrl-C). The Markdown report
# is printed and written to bench/RESULTS.md. See bench/README.md.

set -euo pipefail

# ---------------------------------------------------------------- settings
DURATION=${BENCH_DURATION:-10}       # seconds per measured wrk run
WARMUP=${BENCH_WARMUP:-3}            # seconds of wrk warm-up per path and concurrency
ROUNDS=${BENCH_ROUNDS:-3}            # interleaved rounds; the report shows the median
COLD_REPS=${BENCH_COLD_REPS:-5}      # cold first-request samples (client proxy restarted)
CACHED_REPS=${BENCH_CACHED_REPS:-5}  # cached-request samples after each cold one
CONCURRENCIES=${BENCH_CONCURRENCY:-"1 32"}
# One wrk thread: the machine has two cores, shared by wrk, hello and both proxies;
# a second wrk thread would take CPU from the proxies it measures.
WRK_THREADS=${BENCH_WRK_THREADS:-1}
NGINX_WORKERS=${BENCH_NGINX_WORKERS:-1}
START_TIMEOUT=${BENCH_START_TIMEOUT:-60}  # seconds for any daemon to become ready
SERVICE=hello-world-server

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET_DIR/release
RESULTS=${BENCH_RESULTS:-$BENCH_DIR/RESULTS.md}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/physarum-bench.XXXXXX")
PIDS=()          # every process we started, in start order
NGINX_MASTERS=() # nginx masters (their workers are found through them)
INSTALLED_NGINX=0

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- processes
# Is PID alive (and not a zombie waiting to be reaped)?
alive() {
    local state
    state=$(awk '{sub(/^.*\) /, ""); print $1}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

# Stop one process we started: SIGTERM, up to 8 s to exit, then SIGKILL; reap it.
stop_pid() {
    local pid=$1 i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 160; i++)); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then
        log "pid $pid did not stop on SIGTERM: killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

cleanup() {
    local status=$? i pid workers=()
    trap - EXIT INT TERM
    # nginx workers are the masters' children: note them before stopping the masters.
    for pid in "${NGINX_MASTERS[@]}"; do
        workers+=($(pgrep -P "$pid" 2>/dev/null || true))
    done
    # Newest first: client proxy before service proxy before registry, bootstrap last.
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        stop_pid "${PIDS[i]}"
    done
    for pid in "${workers[@]}"; do
        if alive "$pid"; then
            log "nginx worker $pid outlived its master: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [[ $status -ne 0 ]]; then
        log "failed (exit $status); daemon logs kept in $WORK/logs"
        for f in "$WORK"/logs/*.log "$WORK"/nginx-*/error.log; do
            [[ -s $f ]] || continue
            printf '\n--- %s (last 15 lines)\n' "$f" >&2
            tail -n 15 "$f" >&2
        done
    elif [[ -z ${BENCH_KEEP_WORK:-} ]]; then
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Start a daemon in the background with its output in logs/NAME.log; sets STARTED_PID.
start() {
    local name=$1
    shift
    (cd "$WORK" && exec "$@") >"$WORK/logs/$name.log" 2>&1 &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# ---------------------------------------------------------------- readiness
# A port nobody listens on and that we have not handed out yet. It is taken below
# the kernel's ephemeral range: the libp2p listeners (tcp/0) and every outgoing
# connection get ports from that range, and one of them could otherwise take a
# port between our check and the daemon's bind.
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range
PORT_LOW=$((EPHEMERAL_LOW > 12000 ? 10000 : 1024))
PORT_SPAN=$((EPHEMERAL_LOW - PORT_LOW))
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$((PORT_LOW + (RANDOM * 32768 + RANDOM) % PORT_SPAN))
        [[ $USED_PORTS == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}

# Poll until `curl URL` succeeds (2xx), PID exits, or the deadline passes.
wait_http() {
    local what=$1 url=$2 pid=$3 deadline=$((SECONDS + START_TIMEOUT))
    until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        alive "$pid" || die "$what exited while starting (log: $WORK/logs)"
        ((SECONDS < deadline)) || die "$what not ready at $url within ${START_TIMEOUT}s"
        sleep 0.05
    done
}

# Poll until TCP PORT accepts connections.
wait_port() {
    local what=$1 port=$2 pid=$3 deadline=$((SECONDS + START_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        alive "$pid" || die "$what exited while starting"
        ((SECONDS < deadline)) || die "$what not listening on $port within ${START_TIMEOUT}s"
        sleep 0.05
    done
}

# ---------------------------------------------------------------- setup
build() {
    log "building release binaries (CARGO_TARGET_DIR=$TARGET_DIR)"
    (cd "$REPO" && CARGO_TARGET_DIR=$TARGET_DIR cargo build --release -p physarum) ||
        die "cargo build failed"
    local b
    for b in physarum proxy bootstrap registry hello; do
        [[ -x $BIN/$b ]] || die "missing binary $BIN/$b after the build"
    done
}

# Install nginx, wrk and curl from the distribution when missing.
ensure_tools() {
    local pkgs=() sudo=""
    PATH=$PATH:/usr/sbin # nginx lives there; not on every user's PATH
    command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup) first"
    command -v nginx >/dev/null || pkgs+=(nginx-light)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v curl >/dev/null || pkgs+=(curl)
    ((${#pkgs[@]})) || return 0
    [[ $(id -u) -eq 0 ]] || sudo=sudo
    command -v apt-get >/dev/null || die "missing ${pkgs[*]} and no apt-get to install them"
    log "installing ${pkgs[*]}"
    local had_nginx_pid=0
    [[ -e /run/nginx.pid ]] && had_nginx_pid=1
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -q "${pkgs[@]}" >"$WORK/apt.log" 2>&1; then
        # A fresh machine may have no package lists yet; nginx-light is gone from
        # some releases, where the plain nginx package is the small one.
        $sudo apt-get update -q >>"$WORK/apt.log" 2>&1 || true
        if ! $sudo apt-get install -y -q "${pkgs[@]}" >>"$WORK/apt.log" 2>&1; then
            pkgs=("${pkgs[@]/nginx-light/nginx}")
            $sudo apt-get install -y -q "${pkgs[@]}" >>"$WORK/apt.log" 2>&1 ||
                die "apt-get install ${pkgs[*]} failed (see $WORK/apt.log)"
        fi
    fi
    [[ " ${pkgs[*]} " == *" nginx"* ]] && INSTALLED_NGINX=1
    # Outside containers the package starts a system nginx on port 80: not ours to
    # measure, and we leave no nginx behind.
    if ((INSTALLED_NGINX && !had_nginx_pid)) && [[ -s /run/nginx.pid ]]; then
        log "stopping the system nginx the package just started"
        $sudo kill -QUIT "$(cat /run/nginx.pid)" 2>/dev/null || true
    fi
}

start_hello() {
    HELLO_PORT=$(free_port)
    start hello "$BIN/hello" --bind 127.0.0.1 --port "$HELLO_PORT"
    HELLO_PID=$STARTED_PID
    wait_http hello "http://127.0.0.1:$HELLO_PORT/healthz" "$HELLO_PID"
}

# One nginx hop from bench/nginx-hop.conf.in; sets NGINX_PID.
start_nginx() {
    local name=$1 port=$2 upstream=$3 location=$4 pass_path=$5
    local prefix=$WORK/nginx-$name
    mkdir -p "$prefix/tmp"
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@PORT@|$port|g" -e "s|@UPSTREAM_PORT@|$upstream|g" \
        -e "s|@LOCATION@|$location|g" -e "s|@PASS_PATH@|$pass_path|g" -e "s|@WORKERS@|$NGINX_WORKERS|g" \
        "$BENCH_DIR/nginx-hop.conf.in" >"$prefix/nginx.conf"
    nginx -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" ||
        die "nginx rejects $prefix/nginx.conf"
    start "nginx-$name" nginx -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf"
    NGINX_PID=$STARTED_PID
    NGINX_MASTERS+=("$NGINX_PID")
    wait_port "nginx $name" "$port" "$NGINX_PID"
}

start_nginx_pair() {
    NGINX_BACK_PORT=$(free_port)
    NGINX_FRONT_PORT=$(free_port)
    start_nginx back "$NGINX_BACK_PORT" "$HELLO_PORT" / ""
    NGINX_BACK_PID=$NGINX_PID
    start_nginx front "$NGINX_FRONT_PORT" "$NGINX_BACK_PORT" "/$SERVICE/" /
    NGINX_FRONT_PID=$NGINX_PID
    wait_http "nginx two hops" "http://127.0.0.1:$NGINX_FRONT_PORT/$SERVICE/" "$NGINX_FRONT_PID"
}

# Options every physarum daemon gets: our config file, loopback only, the bootstrap.
net_args() {
    local name=$1 listen=${2:-/ip4/127.0.0.1/tcp/0}
    NET=(--configfile "$WORK/conf.json" --listen "$listen")
    [[ -n ${BOOTSTRAP_ADDR:-} ]] && NET+=(--bootstrap "$BOOTSTRAP_ADDR")
    [[ $name == proxy* ]] || NET+=(--key "$WORK/$name.key")
    true
}

start_physarum() {
    cat >"$WORK/conf.json" <<'EOF'
{"Perf": {"SoftReq": {"RTT": 100}, "HardReq": {"RTT": 1000}}, "Bootstraps": []}
EOF
    # Bootstrap on a known port; its peer id is in its start-up log.
    local boot_port m peer deadline
    boot_port=$(free_port)
    m=$(free_port)
    net_args bootstrap "/ip4/127.0.0.1/tcp/$boot_port"
    start bootstrap "$BIN/bootstrap" "${NET[@]}" --metrics "127.0.0.1:$m"
    BOOTSTRAP_PID=$STARTED_PID
    wait_http bootstrap "http://127.0.0.1:$m/metrics" "$BOOTSTRAP_PID"
    deadline=$((SECONDS + START_TIMEOUT))
    until peer=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/logs/bootstrap.log" |
        grep -oE 'libp2p Node with PID [A-Za-z0-9]+' | awk '{print $NF}' | head -n1) && [[ -n $peer ]]; do
        ((SECONDS < deadline)) || die "no peer id in the bootstrap's log"
        sleep 0.05
    done
    BOOTSTRAP_ADDR=/ip4/127.0.0.1/tcp/$boot_port/p2p/$peer

    m=$(free_port)
    net_args registry
    start registry "$BIN/registry" "${NET[@]}" --data-dir "$WORK/registry-data" --metrics "127.0.0.1:$m"
    REGISTRY_PID=$STARTED_PID
    wait_http registry "http://127.0.0.1:$m/metrics" "$REGISTRY_PID"

    # Register hello. Exec is what an allocator would run; none runs here, since
    # the service-mode proxy below advertises the already running instance.
    cat >"$WORK/$SERVICE.json" <<EOF
{"Name": "$SERVICE", "Exec": {"Program": "$BIN/hello", "Args": []},
 "NetworkSoftReq": 100, "NetworkHardReq": 1000, "CpuReq": 100, "MemoryReq": 16}
EOF
    net_args cli
    (cd "$WORK" && timeout 60 "$BIN/physarum" registry "${NET[@]}" add "$WORK/$SERVICE.json") \
        >"$WORK/logs/registry-add.log" 2>&1 || die "physarum registry add failed: $(cat "$WORK/logs/registry-add.log")"

    SPROXY_PORT=$(free_port)
    m=$(free_port)
    net_args proxy
    start service-proxy "$BIN/proxy" "${NET[@]}" "$SPROXY_PORT" "$SERVICE" "127.0.0.1:$HELLO_PORT" "$m"
    SPROXY_PID=$STARTED_PID
    wait_http "service proxy" "http://127.0.0.1:$m/metrics" "$SPROXY_PID"

    start_client_proxy client-proxy
    # Discovery (registry + DHT providers) is ready once a request goes through.
    wait_http "physarum two hops" "http://127.0.0.1:$CPROXY_PORT/$SERVICE/" "$CPROXY_PID"
}

# An anonymous (client) proxy on a fresh port; sets CPROXY_PORT and CPROXY_PID.
# Ready = metrics endpoint up (the node runs and has joined) and HTTP port open.
start_client_proxy() {
    local name=$1 m
    CPROXY_PORT=$(free_port)
    m=$(free_port)
    net_args proxy
    start "$name" "$BIN/proxy" "${NET[@]}" --metrics "127.0.0.1:$m" "$CPROXY_PORT"
    CPROXY_PID=$STARTED_PID
    wait_http "client proxy" "http://127.0.0.1:$m/metrics" "$CPROXY_PID"
    wait_port "client proxy" "$CPROXY_PORT" "$CPROXY_PID"
}

# ---------------------------------------------------------------- measuring
CLK_TCK=$(getconf CLK_TCK)

# CPU time (user+system) of the given PIDs, in clock ticks.
cpu_ticks() {
    local pid t=0 v
    for pid in "$@"; do
        v=$(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$pid/stat" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}

# "VmRSS VmHWM" of PID in KiB.
mem_kib() {
    awk '/^VmRSS:/ {r=$2} /^VmHWM:/ {h=$2} END {print r+0, h+0}' "/proc/$1/status"
}

# Resident memory of nginx hop = master + workers.
nginx_pids() { echo "$1" $(pgrep -P "$1" || true); }

# RSS in MiB (one decimal) of a set of PIDs: "rss hwm".
mem_mib() {
    local pid r=0 h=0 rr hh
    for pid in "$@"; do
        read -r rr hh < <(mem_kib "$pid")
        r=$((r + rr))
        h=$((h + hh))
    done
    awk -v r="$r" -v h="$h" 'BEGIN {printf "%.1f %.1f\n", r/1024, h/1024}'
}

# wrk latency text ("62.00us", "1.20ms", "1.01s") -> microseconds.
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) m = 1; else if (v ~ /ms$/) m = 1000; else if (v ~ /s$/) m = 1000000; else m = 1
        printf "%.0f\n", n * m }'
}

# Run wrk against URL with C connections for D seconds, while counting the CPU time
# of hello and of the path's proxies (the remaining arguments: their PIDs). Appends
# one line to $WORK/runs.tsv, the columns listed in RUN_COLUMNS.
RUN_COLUMNS="round path conns req/s p50_us p99_us requests errors cpu_us_per_req_proxies cpu_us_per_req_hello"
measure() {
    local round=$1 path=$2 conns=$3 url=$4
    shift 4
    local out=$WORK/wrk-$path-c$conns-r$round.txt h0 h1 p0 p1
    h0=$(cpu_ticks "$HELLO_PID")
    p0=$(cpu_ticks "$@")
    wrk --latency -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" --timeout 10s "$url" >"$out" 2>&1 ||
        die "wrk failed: $(cat "$out")"
    h1=$(cpu_ticks "$HELLO_PID")
    p1=$(cpu_ticks "$@")
    local rps p50 p99 reqs errs cpu_p cpu_h
    rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
    p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$out")")
    p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$out")")
    reqs=$(awk '/requests in/ {print $1}' "$out")
    errs=$(awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/,/, ""); n += $4 + $6 + $8 + $10} END {print n + 0}' "$out")
    [[ -n $rps && -n $reqs ]] || die "cannot read wrk output $out"
    cpu_p=$(per_request $((p1 - p0)) "$reqs")
    cpu_h=$(per_request $((h1 - h0)) "$reqs")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$path" "$conns" "$rps" "$p50" "$p99" "$reqs" \
        "$errs" "$cpu_p" "$cpu_h" >>"$WORK/runs.tsv"
    log "round $round $path c$conns: $rps req/s, p50 ${p50}us, p99 ${p99}us, errors $errs," \
        "CPU/request: proxies ${cpu_p}us, hello ${cpu_h}us"
}

# Clock ticks spent over N requests -> microseconds per request.
per_request() {
    awk -v d="$1" -v t="$CLK_TCK" -v r="$2" 'BEGIN {printf "%.1f\n", r ? d / t * 1e6 / r : 0}'
}

warm_up() {
    local path=$1 url=$2 c
    for c in $CONCURRENCIES; do
        wrk -t"$WRK_THREADS" -c"$c" -d"${WARMUP}s" "$url" >"$WORK/warmup-$path-c$c.txt" 2>&1 || die "warm-up of $path failed"
    done
}

# The three paths, interleaved round by round so that changes in the machine's
# load hit all of them alike.
run_load() {
    local url_direct="http://127.0.0.1:$HELLO_PORT/"
    local url_nginx="http://127.0.0.1:$NGINX_FRONT_PORT/$SERVICE/"
    local url_physarum="http://127.0.0.1:$CPROXY_PORT/$SERVICE/"
    : >"$WORK/runs.tsv"
    log "warming up (${WARMUP}s per path and concurrency)"
    warm_up direct "$url_direct"
    warm_up nginx "$url_nginx"
    warm_up physarum "$url_physarum"
    local r c
    for ((r = 1; r <= ROUNDS; r++)); do
        echo "round $r: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/loadavg.txt"
        for c in $CONCURRENCIES; do
            measure "$r" direct "$c" "$url_direct"
            measure "$r" nginx "$c" "$url_nginx" $(nginx_pids "$NGINX_FRONT_PID") $(nginx_pids "$NGINX_BACK_PID")
            measure "$r" physarum "$c" "$url_physarum" "$CPROXY_PID" "$SPROXY_PID"
        done
    done
}

# Median of the numbers on stdin.
median() {
    sort -g | awk '{v[NR] = $1} END {
        if (NR == 0) { print "-"; exit }
        if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Median over rounds of column COL (see RUN_COLUMNS) for PATH at CONNS.
med_stat() {
    awk -F'\t' -v p="$2" -v c="$3" -v k="$1" '$2 == p && $3 == c {print $k}' "$WORK/runs.tsv" | median
}

total_errors() {
    awk -F'\t' -v p="$1" '$2 == p {n += $8} END {print n + 0}' "$WORK/runs.tsv"
}

# curl's time_total for one request, in microseconds; fails on a non-2xx answer.
curl_us() {
    local out code t
    out=$(curl -s -o /dev/null --max-time 30 -w '%{http_code} %{time_total}' "$1") || return 1
    read -r code t <<<"$out"
    [[ $code == 2* ]] || return 1
    awk -v t="$t" 'BEGIN {printf "%.0f\n", t * 1e6}'
}

# Cold first request: a fresh client proxy (empty registry and peer caches, new
# identity) asks for the service, whose instance is already running; then cached
# requests through the same proxy. Between cold samples the client proxy restarts.
run_cold() {
    : >"$WORK/cold.txt"
    : >"$WORK/cached.txt"
    local i j t
    # The load phase's client proxy goes first: each sample gets its own.
    stop_pid "$CPROXY_PID"
    forget_pid "$CPROXY_PID"
    for ((i = 1; i <= COLD_REPS; i++)); do
        start_client_proxy "cold-proxy-$i"
        t=$(curl_us "http://127.0.0.1:$CPROXY_PORT/$SERVICE/") || die "cold request $i failed"
        echo "$t" >>"$WORK/cold.txt"
        for ((j = 1; j <= CACHED_REPS; j++)); do
            t=$(curl_us "http://127.0.0.1:$CPROXY_PORT/$SERVICE/") || die "cached request failed"
            echo "$t" >>"$WORK/cached.txt"
        done
        log "cold sample $i: $(tail -n1 "$WORK/cold.txt")us first request"
        stop_pid "$CPROXY_PID"
        forget_pid "$CPROXY_PID"
    done
    # The same single curl request, for scale, on the other two paths.
    : >"$WORK/curl-direct.txt"
    : >"$WORK/curl-nginx.txt"
    for ((j = 1; j <= CACHED_REPS; j++)); do
        curl_us "http://127.0.0.1:$HELLO_PORT/" >>"$WORK/curl-direct.txt" || die "direct curl failed"
        curl_us "http://127.0.0.1:$NGINX_FRONT_PORT/$SERVICE/" >>"$WORK/curl-nginx.txt" || die "nginx curl failed"
    done
}

# ---------------------------------------------------------------- report
fmt_int() { awk -v v="$1" 'BEGIN {if (v == "-") print "-"; else printf "%.0f\n", v}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f×\n", a / b}'; }
ms() { awk -v v="$1" 'BEGIN {if (v == "-") print "-"; else printf "%.2f ms\n", v / 1000}'; }
minmax_ms() { sort -g "$1" | awk 'NR == 1 {a = $1} {b = $1} END {printf "%.2f–%.2f ms\n", a / 1000, b / 1000}'; }

report() {
    local c row d n p
    {
        echo "# physarum benchmark results"
        echo
        echo "- date: $RUN_DATE"
        echo "- machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(uname -sr)"
        echo "- load before the run: \`$LOAD_BEFORE\`"
        echo "- load after the run: \`$(uptime)\`"
        echo "- load average at the start of each round: $(paste -sd';' "$WORK/loadavg.txt" | sed 's/;/; /g')"
        echo "- git commit: $GIT_COMMIT"
        echo "- tools: $(nginx -v 2>&1 | sed 's/^nginx version: //'), $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), $(rustc -V 2>/dev/null || echo rustc ?)"
        echo "- command: \`$COMMAND\`"
        echo
        echo "Each figure is the median of $ROUNDS interleaved rounds of \`wrk --latency -t$WRK_THREADS -c<N> -d${DURATION}s\`"
        echo "(after ${WARMUP}s of warm-up per path and concurrency), all on 127.0.0.1. *direct* = wrk → hello;"
        echo "*nginx 2 hops* = wrk → nginx → nginx → hello (upstream keep-alive, $NGINX_WORKERS worker each);"
        echo "*physarum 2 hops* = wrk → client proxy → libp2p tunnel → service proxy → hello."
        echo "Latencies in µs. CPU/request = user+system time (from /proc/PID/stat) of both proxies (nginx:"
        echo "masters + workers), and of hello, over the run divided by the requests served. Memory is VmRSS"
        echo "(peak = VmHWM) in MiB, client/front hop + service/back hop (nginx: master + worker)."
        echo
        echo "| figure | direct | nginx 2 hops | physarum 2 hops | physarum / direct | physarum / nginx |"
        echo "|---|---:|---:|---:|---:|---:|"
        for c in $CONCURRENCIES; do
            d=$(med_stat 4 direct "$c"); n=$(med_stat 4 nginx "$c"); p=$(med_stat 4 physarum "$c")
            echo "| c$c requests/s | $(fmt_int "$d") | $(fmt_int "$n") | $(fmt_int "$p") | $(ratio "$p" "$d") | $(ratio "$p" "$n") |"
            d=$(med_stat 5 direct "$c"); n=$(med_stat 5 nginx "$c"); p=$(med_stat 5 physarum "$c")
            echo "| c$c p50 µs | $(fmt_int "$d") | $(fmt_int "$n") | $(fmt_int "$p") | $(ratio "$p" "$d") | $(ratio "$p" "$n") |"
            d=$(med_stat 6 direct "$c"); n=$(med_stat 6 nginx "$c"); p=$(med_stat 6 physarum "$c")
            echo "| c$c p99 µs | $(fmt_int "$d") | $(fmt_int "$n") | $(fmt_int "$p") | $(ratio "$p" "$d") | $(ratio "$p" "$n") |"
            n=$(med_stat 9 nginx "$c"); p=$(med_stat 9 physarum "$c")
            echo "| c$c CPU µs/request, both proxies | | $n | $p | | $(ratio "$p" "$n") |"
            d=$(med_stat 10 direct "$c"); n=$(med_stat 10 nginx "$c"); p=$(med_stat 10 physarum "$c")
            echo "| c$c CPU µs/request, hello | $d | $n | $p | $(ratio "$p" "$d") | $(ratio "$p" "$n") |"
        done
        echo "| errors (non-2xx + socket), all runs | $(total_errors direct) | $(total_errors nginx) | $(total_errors physarum) | | |"
        echo "| RSS idle, MiB | | $MEM_NGINX_IDLE | $MEM_PHYS_IDLE | | |"
        echo "| RSS after load, MiB | | $MEM_NGINX_AFTER | $MEM_PHYS_AFTER | | |"
        echo "| peak RSS (VmHWM), MiB | | $MEM_NGINX_PEAK | $MEM_PHYS_PEAK | | |"
        d=$(median <"$WORK/curl-direct.txt"); n=$(median <"$WORK/curl-nginx.txt"); p=$(median <"$WORK/cached.txt")
        echo "| one curl request, cached (median of $(wc -l <"$WORK/cached.txt")) | $(ms "$d") | $(ms "$n") | $(ms "$p") | $(ratio "$p" "$d") | $(ratio "$p" "$n") |"
        p=$(median <"$WORK/cold.txt")
        echo "| first request, cold client proxy (median of $COLD_REPS; range $(minmax_ms "$WORK/cold.txt")) | | | $(ms "$p") | | |"
        echo
        echo "<details><summary>raw runs</summary>"
        echo
        echo '```'
        echo "$RUN_COLUMNS" | tr ' ' '\t'
        cat "$WORK/runs.tsv"
        echo "cold first request, µs: $(paste -sd' ' "$WORK/cold.txt")"
        echo "cached request, µs: $(paste -sd' ' "$WORK/cached.txt")"
        echo '```'
        echo
        echo "</details>"
    } >"$WORK/report.md"
    cp "$WORK/report.md" "$RESULTS"
    cat "$WORK/report.md"
    log "written to $RESULTS"
}

# ---------------------------------------------------------------- main
main() {
    COMMAND="BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP BENCH_ROUNDS=$ROUNDS BENCH_COLD_REPS=$COLD_REPS bench/run.sh"
    RUN_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
    LOAD_BEFORE=$(uptime)
    GIT_COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
    # GIT_OPTIONAL_LOCKS=0: `git status` must not rewrite the index.
    if [[ -n $(cd "$REPO" && GIT_OPTIONAL_LOCKS=0 git status --porcelain 2>/dev/null | head -n1) ]]; then
        GIT_COMMIT+=" (with uncommitted changes)"
    fi
    mkdir -p "$WORK/logs"
    export PHYSARUM_HOME=$WORK NO_COLOR=1 RUST_LOG=${RUST_LOG:-info}
    unset P2P_BOOTSTRAPS P2P_PSK
    log "load before the run: $LOAD_BEFORE"

    ensure_tools
    build

    start_hello
    start_nginx_pair
    start_physarum
    log "all up: hello :$HELLO_PORT, nginx :$NGINX_FRONT_PORT -> :$NGINX_BACK_PORT, physarum :$CPROXY_PORT -> :$SPROXY_PORT"

    MEM_NGINX_IDLE=$(mem_mib $(nginx_pids "$NGINX_FRONT_PID") | cut -d' ' -f1)" + "$(mem_mib $(nginx_pids "$NGINX_BACK_PID") | cut -d' ' -f1)
    MEM_PHYS_IDLE=$(mem_mib "$CPROXY_PID" | cut -d' ' -f1)" + "$(mem_mib "$SPROXY_PID" | cut -d' ' -f1)

    run_load

    local f b
    read -r f fp < <(mem_mib $(nginx_pids "$NGINX_FRONT_PID"))
    read -r b bp < <(mem_mib $(nginx_pids "$NGINX_BACK_PID"))
    MEM_NGINX_AFTER="$f + $b"
    MEM_NGINX_PEAK="$fp + $bp"
    read -r f fp < <(mem_mib "$CPROXY_PID")
    read -r b bp < <(mem_mib "$SPROXY_PID")
    MEM_PHYS_AFTER="$f + $b"
    MEM_PHYS_PEAK="$fp + $bp"

    log "cold vs cached first request ($COLD_REPS samples)"
    run_cold

    report
}

main "$@"
