#!/usr/bin/env bash
# The local GateSvr cluster on Docker (deploy/compose.yaml): 3 control-plane nodes, 3 data-plane
# nodes, demo upstreams for zones 001..006.
#
#   deploy/cluster.sh up [--build]     start (or update) it and wait until it serves;
#                                      --build runs deploy/build-image.sh first
#   deploy/cluster.sh status           containers, `gatectl cluster status` as each control-plane
#                                      node sees it, zones, each data plane's /ready and ports
#   deploy/cluster.sh logs [-f] [SVC]  container logs (all services, or the ones named)
#   deploy/cluster.sh smoke            requests through every data plane with gate-client: echo,
#                                      whoami, and a push (join + say) to a second client
#   deploy/cluster.sh down [--volumes] stop and remove it (replacement data planes too);
#                                      --volumes also deletes raft data, state files and certs
#   deploy/cluster.sh rolling-upgrade [--tag IMAGE] [--no-load] [--drain prestop|sigterm]
#                                      [--before S] [--after S] [--min-ready S]
#                                      replace the data planes one at a time as a Deployment with
#                                      maxUnavailable 0 / maxSurge 1 and a preStop drain does,
#                                      under client load (gate-bench load); prints the figures
#   deploy/cluster.sh load [--duration S]  the same client load with no upgrade (a baseline)
#
# Environment: GATESVR_IMAGE (default gatesvr:dev), GATESVR_COMPOSE_PROJECT (default gatesvr),
# GATESVR_UP_TIMEOUT seconds to wait in `up` (default 120), GATE_BENCH (host gate-bench binary
# for the load; default target/release/gate-bench), LOAD_ARGS (extra `gate-bench load`
# arguments, e.g. "--listeners 48 --rate 2"), LOAD_DRIVER=loadgen to drive the load with
# deploy/loadgen.py instead (GATE_CLIENT, LOADGEN_ARGS).
# Exit codes: 0 ok, 1 failure (what failed is printed), 2 usage or not implemented.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

export GATESVR_IMAGE="${GATESVR_IMAGE:-gatesvr:dev}"
project="${GATESVR_COMPOSE_PROJECT:-gatesvr}"
up_timeout="${GATESVR_UP_TIMEOUT:-120}"
secrets="$here/.local/secrets"
CPS=(cp-1 cp-2 cp-3)
DPS=(dp-1 dp-2 dp-3)
ZONES=(001 002 003 004 005 006)

die() { echo "cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; }

if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    compose_cmd=()
fi
compose() {
    [[ ${#compose_cmd[@]} -gt 0 ]] || die "neither 'docker compose' nor 'docker-compose' is installed"
    "${compose_cmd[@]}" -f "$here/compose.yaml" -p "$project" "$@"
}

# gatectl inside a control-plane container (the image has no shell; gatectl runs directly).
gatectl_on() {
    local cp="$1"; shift
    compose exec -T "$cp" gatectl --endpoints "https://$cp:8095" --cacert /certs/ca.crt --token-file /run/secrets/admin_token "$@"
}

# HTTP status code of GET http://HOSTPORT/PATH, or 000 when unreachable (no curl needed).
http_code() {
    local hostport="$1" path="$2"
    timeout 5 bash -c '
        exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
        printf "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n" "$2" "$1" >&3
        read -r _ code _ <&3 && echo "$code"' _ "$hostport" "$path" 2>/dev/null || echo 000
}

host_port() { # the 127.0.0.1:PORT a container port is published on
    compose port "$@" 2>/dev/null | tail -1
}

ensure_secrets() {
    mkdir -p "$secrets"
    chmod 0755 "$here/.local" "$secrets"
    # Dev-only secrets, bind-mounted into containers that run as uid 65532: world-readable.
    for name in admin-token hmac.key ops-token; do
        if [[ ! -s "$secrets/$name" ]]; then
            od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$secrets/$name"
            echo "   generated deploy/.local/secrets/$name"
        fi
        chmod 0644 "$secrets/$name"
    done
}

wait_for() { # wait_for DESCRIPTION COMMAND...: retries COMMAND until it succeeds or times out
    local what="$1"; shift
    local deadline=$((SECONDS + up_timeout))
    until "$@" >/dev/null 2>&1; do
        if (( SECONDS >= deadline )); then
            echo "   timed out after ${up_timeout}s waiting for $what" >&2
            return 1
        fi
        sleep 2
    done
    echo "   $what: ok"
}

# ---- data-plane containers ------------------------------------------------------------
# dp-1..dp-3 start as compose services; `rolling-upgrade` replaces them with containers it
# runs itself (label gatesvr.project). Both carry the label gatesvr.dp-slot=N.

dp_list() { # "name slot ip node_id" of every running data-plane container, by slot
    local ids
    ids=$( { docker ps -q --filter "label=com.docker.compose.project=$project" --filter label=gatesvr.dp-slot
             docker ps -q --filter "label=gatesvr.project=$project" --filter label=gatesvr.dp-slot; } | sort -u)
    [[ -n "$ids" ]] || return 0
    # shellcheck disable=SC2086
    # The hostname is the node id (compose: hostname dp-N; replacements: --hostname dp-N-gG).
    docker inspect -f '{{.Name}} {{index .Config.Labels "gatesvr.dp-slot"}} {{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}} {{.Config.Hostname}}' $ids 2>/dev/null |
        sed 's|^/||' | sort -k2,2n -k1,1
}

# /ready of a data plane by container IP (the host reaches the compose network directly), or
# through its published port when it does not.
dp_ready_ip() { [[ "$(http_code "$1:8080" /ready)" == 200 ]]; }
dp_ready() { [[ "$(http_code "$(host_port "$1" 8080)" /ready)" == 200 ]]; }

write_routable() { # the QUIC addresses a Service would send new flows to: ready, not draining
    local file="$here/.local/routable" exclude="${1:-}" tmp
    tmp=$(mktemp "$here/.local/routable.XXXX")
    while read -r name slot ip node; do
        [[ -n "$ip" && "$name" != "$exclude" ]] || continue
        dp_ready_ip "$ip" && echo "$ip:8453"
    done < <(dp_list) > "$tmp"
    mv "$tmp" "$file"
}

replaced_slots_scale() { # --scale dp-N=0 for slots now served by a replacement container
    local name slot ip node
    while read -r name slot ip node; do
        [[ "$node" == *-g* ]] && echo "--scale dp-$slot=0"
    done < <(dp_list) | sort -u
}

upstreams_registered() { # every zone has at least one upstream registered
    local out z
    out=$(gatectl_on cp-1 zones list 2>/dev/null) || return 1
    for z in "${ZONES[@]}"; do
        # ZONE  UPSTREAMS  SERVICES
        awk -v z="$z" '$1 == z && $2 >= 1 { ok = 1 } END { exit !ok }' <<<"$out" || return 1
    done
}

cmd_up() {
    local build=0
    for a in "$@"; do
        case "$a" in
            --build) build=1 ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    if [[ $build == 1 ]]; then "$here/build-image.sh"; fi
    docker image inspect "$GATESVR_IMAGE" >/dev/null 2>&1 ||
        die "image $GATESVR_IMAGE not found: run deploy/build-image.sh (or cluster.sh up --build)"
    echo "== secrets"
    ensure_secrets
    echo "== starting (project $project, image $GATESVR_IMAGE)"
    # shellcheck disable=SC2046
    compose up -d --remove-orphans $(replaced_slots_scale)
    echo "== waiting (up to ${up_timeout}s each)"
    # A linearizable read succeeds only once a leader holds a quorum.
    wait_for "control plane quorum (gatectl zones list via cp-1)" gatectl_on cp-1 zones list ||
        { compose logs --tail=30 "${CPS[@]}" >&2; die "the control plane has no leader"; }
    # The demo upstreams register themselves over mTLS (gate-upstream --cp-tls-*).
    wait_for "upstreams of zones ${ZONES[*]} registered" upstreams_registered ||
        { compose logs --tail=20 up-001 >&2; die "the demo upstreams did not register"; }
    local name slot ip node
    while read -r name slot ip node; do
        wait_for "$node /ready ($name)" dp_ready_ip "$ip" ||
            { docker logs --tail=30 "$name" >&2; die "$node is not ready"; }
    done < <(dp_list)
    echo
    cmd_status
}

cmd_status() {
    local failed=0
    echo "== containers"
    compose ps
    for cp in "${CPS[@]}"; do
        echo
        echo "== gatectl --endpoints https://$cp:8095 cluster status (run in $cp)"
        gatectl_on "$cp" cluster status || { echo "   $cp: gatectl failed (exit $?)"; failed=1; }
    done
    echo
    echo "== gatectl zones list"
    gatectl_on cp-1 zones list || { echo "   gatectl zones list failed (exit $?)"; failed=1; }
    echo
    echo "== gatectl nodes list (data planes joined to the control plane)"
    gatectl_on cp-1 nodes list || { echo "   gatectl nodes list failed (exit $?)"; failed=1; }
    echo
    echo "== data planes"
    printf '%-22s %-10s %-14s %-6s %-6s %-22s %-22s %s\n' CONTAINER NODE IP HEALTH READY HTTP QUIC/UDP METRICS
    local name slot ip node
    while read -r name slot ip node; do
        local http quic metrics health ready
        http=$(docker port "$name" 8080/tcp 2>/dev/null | head -1); quic=$(docker port "$name" 8453/udp 2>/dev/null | head -1)
        metrics=$(docker port "$name" 9090/tcp 2>/dev/null | head -1)
        health=$(http_code "$ip:8080" /health); ready=$(http_code "$ip:8080" /ready)
        printf '%-22s %-10s %-14s %-6s %-6s %-22s %-22s %s\n' "$name" "$node" "$ip" "$health" "$ready" "${http:--}" "${quic:--}" "${metrics:--}"
        [[ "$ready" == 200 ]] || failed=1
    done < <(dp_list)
    echo
    echo "admin API (cp-1): http://$(host_port cp-1 8095)   token: deploy/.local/secrets/admin-token"
    echo "try: deploy/cluster.sh smoke"
    return $failed
}

client_run() { # gate-client in a throwaway container on the compose network
    compose run --rm -T client gate-client --ca /certs/ca.crt --token-secret-file /run/secrets/hmac_key "$@" </dev/null
}

cmd_smoke() {
    local name slot ip node failed=0 out
    while read -r name slot ip node; do
        echo "== $node ($ip): echo + whoami"
        if out=$(client_run --addr "$ip:8453" --openid "smoke-$node" --send "echo hello from compose" --send whoami); then
            echo "$out"
        else
            echo "$out"; echo "   FAILED"; failed=1
        fi
    done < <(dp_list)
    # A push through the control-plane-learned route: a listener on the first node, a sender
    # on the last; zone of both: 001 (the demo's rooms live in one upstream per zone).
    local first last
    first=$(dp_list | head -1 | awk '{print $3}'); last=$(dp_list | tail -1 | awk '{print $3}')
    echo "== push: listener on $first joins room smoke, sender on $last says hi"
    local lis=smoke-l0 snd=smoke-s0 i=0
    while [[ "$(python3 -c "import sys;sys.path.insert(0,'$here');import loadgen;print(loadgen.zone_of('smoke-l$i'))")" != 001 ]]; do i=$((i + 1)); done; lis=smoke-l$i
    i=0
    while [[ "$(python3 -c "import sys;sys.path.insert(0,'$here');import loadgen;print(loadgen.zone_of('smoke-s$i'))")" != 001 ]]; do i=$((i + 1)); done; snd=smoke-s$i
    local lfile; lfile=$(mktemp)
    client_run --addr "$first:8453" --openid "$lis" --send "join smoke" --listen 8s >"$lfile" 2>&1 &
    local lpid=$!
    sleep 4
    client_run --addr "$last:8453" --openid "$snd" --send "join smoke" --send "say smoke hi from $snd" --send "leave smoke" || failed=1
    wait "$lpid" || true
    cat "$lfile"
    if grep '"type":"push"' "$lfile" | grep -q "hi from $snd"; then echo "   push delivered"; else echo "   push NOT delivered"; failed=1; fi
    rm -f "$lfile"
    return $failed
}

cmd_logs() { compose logs --tail=200 "$@"; }

cmd_down() {
    local args=(--remove-orphans)
    for a in "$@"; do
        case "$a" in
            --volumes|-v) args+=(--volumes) ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    local ids
    ids=$(docker ps -aq --filter "label=gatesvr.project=$project")
    if [[ -n "$ids" ]]; then
        echo "== removing replacement data planes"
        # shellcheck disable=SC2086
        docker stop -t 45 $ids >/dev/null; docker rm $ids >/dev/null
    fi
    compose down "${args[@]}"
}

# ---- rolling upgrade --------------------------------------------------------------------

gate_client_bin() {
    local bin="${GATE_CLIENT:-}"
    if [[ -z "$bin" ]]; then
        bin="${CARGO_TARGET_DIR:-$here/../target}/release/gate-client"
    fi
    [[ -x "$bin" ]] || die "no gate-client binary at $bin (cargo build --release -p gatesvr-sdk, or set GATE_CLIENT)"
    echo "$bin"
}

gate_bench_bin() {
    local bin="${GATE_BENCH:-${CARGO_TARGET_DIR:-$here/../target}/release/gate-bench}"
    [[ -x "$bin" ]] || die "no gate-bench binary at $bin (cargo build --release -p gate-bench, or set GATE_BENCH; LOAD_DRIVER=loadgen uses deploy/loadgen.py instead)"
    echo "$bin"
}

start_load() { # start_load OUTDIR DURATION: the client load in the background; sets load_pid
    local out="$1" duration="$2" bin
    mkdir -p "$out"
    docker cp "$(compose ps -q cp-1)":/certs/ca.crt "$here/.local/ca.crt" >/dev/null
    rm -f "$out/ready" "$out/stop"
    if [[ "${LOAD_DRIVER:-gate-bench}" == loadgen ]]; then
        bin=$(gate_client_bin)
        # shellcheck disable=SC2086
        python3 "$here/loadgen.py" --gate-client "$bin" --ca "$here/.local/ca.crt" \
            --hmac-key "$secrets/hmac.key" --routable "$here/.local/routable" --out "$out" \
            --phase-file "$here/.local/phase" --ready-file "$out/ready" --stop-file "$out/stop" \
            --duration "$duration" ${LOADGEN_ARGS:-} > "$out/report.txt" 2> "$out/loadgen.log" &
    else
        # gate-bench load: listeners in one chat room of zone 001 (pushes go through the demo
        # upstream: the data planes' gRPC port is not published), requesters on the routable
        # nodes; a session whose node drains follows its GoAway and resumes.
        bin=$(gate_bench_bin)
        # shellcheck disable=SC2086
        "$bin" --ca "$here/.local/ca.crt" --token-secret-file "$secrets/hmac.key" \
            --target-quic-file "$here/.local/routable" \
            load --duration "${duration}s" --phase-file "$here/.local/phase" \
            --ready-file "$out/ready" --stop-file "$out/stop" --out "$out/summary.json" \
            ${LOAD_ARGS:-} > "$out/report.txt" 2> "$out/loadgen.log" &
    fi
    load_pid=$!
    local deadline=$((SECONDS + 60))
    until [[ -f "$out/ready" ]]; do
        kill -0 "$load_pid" 2>/dev/null || { cat "$out/loadgen.log" >&2; die "the load exited"; }
        (( SECONDS < deadline )) || die "load: clients did not connect within 60s"
        sleep 1
    done
    cat "$out/loadgen.log"
}

stop_load() { # stop_load OUTDIR
    touch "$1/stop"
    wait "$load_pid" || echo "   loadgen exited with $?"
    cat "$1/report.txt"
}

cmd_load() {
    local duration=60
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --duration) duration="$2"; shift 2 ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    mkdir -p "$here/.local"
    write_routable
    echo steady > "$here/.local/phase"
    local out="$here/.local/load-$(date +%Y%m%d-%H%M%S)"
    start_load "$out" "$duration"
    wait "$load_pid" || true
    cat "$out/report.txt"
    echo "summary: $out/summary.json"
}

cmd_rolling_upgrade() {
    local tag="$GATESVR_IMAGE" load=1 drain=prestop before=30 after=20 min_ready=5
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --tag) tag="$2"; shift 2 ;;
            --no-load) load=0; shift ;;
            --drain) drain="$2"; shift 2 ;;
            --before) before="$2"; shift 2 ;;
            --after) after="$2"; shift 2 ;;
            --min-ready) min_ready="$2"; shift 2 ;;
            *) usage >&2; exit 2 ;;
        esac
    done
    [[ "$drain" == prestop || "$drain" == sigterm ]] || die "--drain prestop|sigterm"
    docker image inspect "$tag" >/dev/null 2>&1 || die "image $tag not found (deploy/build-image.sh --tag $tag)"
    local network="${project}_gatesvr" grace=45 deadline=35
    [[ -n "$(dp_list)" ]] || die "no data plane is running (cluster.sh up)"
    mkdir -p "$here/.local"
    local out="$here/.local/rolling-upgrade-$(date +%Y%m%d-%H%M%S)"
    mkdir -p "$out"
    write_routable
    echo before > "$here/.local/phase"
    if [[ $load == 1 ]]; then
        echo "== client load (${LOAD_DRIVER:-gate-bench}), ${before}s before the upgrade"
        start_load "$out" 3600
        sleep "$before"
    fi
    echo during > "$here/.local/phase"
    local t_start=$SECONDS
    local slots; slots=$(dp_list | awk '{print $2}' | sort -un)
    for slot in $slots; do
        local old old_ip old_node gen new_ip new_node new_name
        read -r old _ old_ip old_node < <(dp_list | awk -v s="$slot" '$2 == s' | head -1)
        gen=$(docker inspect -f '{{index .Config.Labels "gatesvr.generation"}}' "$old")
        gen=$(( ${gen:-1} + 1 ))
        if [[ "$old_ip" == 10.231.53.2* ]]; then new_ip="10.231.53.4$slot"; else new_ip="10.231.53.2$slot"; fi
        new_node="dp-$slot-g$gen"
        new_name="${project}-dp-$slot-g$gen"
        echo "== slot $slot: surge $new_node ($new_ip, $tag) before $old_node ($old)"
        local t0=$SECONDS
        docker rm -f "$new_name" >/dev/null 2>&1 || true
        docker run -d --name "$new_name" --hostname "$new_node" \
            --network "$network" --ip "$new_ip" --network-alias dataplane \
            --label "gatesvr.project=$project" --label "gatesvr.dp-slot=$slot" --label "gatesvr.generation=$gen" \
            --restart unless-stopped --stop-timeout "$grace" \
            -e "GATESVR_NODE_ID=$new_node" \
            -e "GATESVR_CONTROL_PLANE__ADVERTISE_QUIC_ADDR=$new_ip:8453" \
            -e "GATESVR_CONTROL_PLANE__ADVERTISE_GRPC_ADDR=$new_ip:8092" \
            -e "GATESVR_CONTROL_PLANE__STATE_FILE=/var/lib/gatesvr/$new_node.state" \
            -p 127.0.0.1::8453/udp -p 127.0.0.1::8080 -p 127.0.0.1::9090 \
            -v "$here/compose/dataplane.yaml:/etc/gatesvr/dataplane.yaml:ro" \
            -v "${project}_certs:/certs:ro" -v "${project}_dp-state:/var/lib/gatesvr" \
            -v "$secrets/hmac.key:/run/secrets/hmac_key:ro" \
            -v "$secrets/ops-token:/run/secrets/ops_token:ro" \
            "$tag" gatesvr dataplane --config /etc/gatesvr/dataplane.yaml >/dev/null
        wait_for "$new_node /ready" dp_ready_ip "$new_ip" ||
            { docker logs --tail=30 "$new_name" >&2; die "$new_node never became ready: rollout stopped, $old_node still serves"; }
        echo "   ready after $((SECONDS - t0))s; minReadySeconds $min_ready"
        sleep "$min_ready"
        # The old pod is terminating from here: no new flows reach it. A drained node exits by
        # itself; Docker would restart it (restart: unless-stopped) where the kubelet does not
        # restart the containers of a terminating pod: turn the policy off first.
        docker update --restart=no "$old" >/dev/null
        write_routable "$old"
        local t1=$SECONDS
        if [[ "$drain" == prestop ]]; then
            echo "   preStop: gatesvr drain --ops-addr 127.0.0.1:8081 --token-file /run/secrets/ops_token --deadline ${deadline}s (in $old)"
            timeout $((grace + 5)) docker exec "$old" gatesvr drain --http-addr 127.0.0.1:8080 \
                --ops-addr 127.0.0.1:8081 --token-file /run/secrets/ops_token --deadline "${deadline}s" ||
                echo "   (gatesvr drain ended with $?: the container exits with the node)"
        fi
        echo "   docker stop -t $grace $old (SIGTERM drains what is left, then the node exits)"
        docker stop -t "$grace" "$old" >/dev/null
        local code; code=$(docker inspect -f '{{.State.ExitCode}}' "$old")
        echo "   $old_node stopped after $((SECONDS - t1))s, exit code $code"
        docker logs --tail=400 "$old" > "$out/$old_node.log" 2>&1 || true
        docker rm "$old" >/dev/null
        write_routable
    done
    local took=$((SECONDS - t_start))
    echo "== upgrade done in ${took}s"
    echo after > "$here/.local/phase"
    if [[ $load == 1 ]]; then
        sleep "$after"
        echo "== load report (phases: before the upgrade, during it, after it)"
        stop_load "$out"
        echo "upgrade took ${took}s; data in $out (summary.json, old nodes' logs)"
    fi
    echo
    cmd_status
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) shift; cmd_down "$@" ;;
    status) shift; cmd_status ;;
    logs) shift; cmd_logs "$@" ;;
    smoke) shift; cmd_smoke ;;
    load) shift; cmd_load "$@" ;;
    rolling-upgrade) shift; cmd_rolling_upgrade "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
