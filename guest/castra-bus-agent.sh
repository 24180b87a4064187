#!/usr/bin/env bash
# The Castra bus (PROTOCOL.md) for guests with nothing but bash, dd and od, as on
# BusyBox images: the modes of `castra-guest` (see USAGE).
#
# In agent mode one background process reads the socket (it prints deliveries and
# reports refusals) and one writes it (heartbeats and stdin frames): an ack is never
# read by the wrong loop and two frames never interleave.
set -u
export LC_ALL=C  # ${#var} then counts bytes, which is what a frame length is

read -r -d '' USAGE <<'EOF'
usage:
  castra-bus-agent.sh publish [--topic T] --payload JSON   publish one message ('-': read stdin);
                                                            exit 0 on an ok ack
  castra-bus-agent.sh agent [--subscribe T]... [--stdin-json] [--heartbeat S] [--backoff S] [--backoff-max S]
      stay connected (heartbeats; reconnects after --backoff s, doubling up to --backoff-max),
      print every delivered message as one JSON line on stdout, and with --stdin-json send
      each stdin line as a frame; exit 0 on SIGTERM or Ctrl-C
  castra-bus-agent.sh ping                                  handshake only; exit 0 on "ok"

Every mode also takes --host, --port, --vm, --token and --timeout S (to wait for the
handshake, and for an ack where `timeout` is installed; default 10); without them: $BUS_HOST,
$BUS_PORT, $BUS_VM_NAME and $BUS_TOKEN, else the same names in
/etc/conf.d/castra-handshake (another file: $CASTRA_HANDSHAKE_CONF), else 10.0.2.2,
7070, the short hostname and no token (a token is for hosts with an identities file).

examples:
  castra-bus-agent.sh publish --topic broadcast --payload '{"event":"booted"}'
  castra-bus-agent.sh agent --subscribe broadcast --subscribe "vm:$(hostname)"
EOF


MAX_FRAME=65536

log() { printf 'castra-bus-agent: %s\n' "$*" >&2; }
usage() { printf '%s\n' "$USAGE"; }
usage_error() { log "$*"; exit 2; }

# -- frames on fd 3 -------------------------------------------------------------------

json_string() {  # $1 as a JSON string (backslashes and quotes escaped)
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}

fits() {  # $1 can be one frame
    [ "${#1}" -ge 1 ] && [ "${#1}" -le "$MAX_FRAME" ] && return 0
    log "a frame of ${#1} bytes is not sent (1..$MAX_FRAME)"
    return 1
}

send_frame() {  # $1: a JSON object that fits -> 4-byte big-endian length, then its bytes, in one printf
    local n=${#1}
    printf "$(printf '\\x%02x' $((n >> 24 & 255)) $((n >> 16 & 255)) $((n >> 8 & 255)) $((n & 255)))%s" "$1" >&3
}

read_frame() {  # the next frame's body on stdout; fails at the end of the stream, on a bad length,
    # and with $1, after $1 seconds where `timeout` (coreutils, BusyBox) is installed
    local b n wait=()
    [ -n "${1:-}" ] && command -v timeout >/dev/null && wait=(timeout "$1")
    b=($(${wait[@]+"${wait[@]}"} dd bs=1 count=4 <&3 2>/dev/null | od -An -tu1))
    [ "${#b[@]}" -eq 4 ] || return 1
    n=$(((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]))
    if [ "$n" -lt 1 ] || [ "$n" -gt "$MAX_FRAME" ]; then
        log "bad frame length $n from the host"
        return 1
    fi
    ${wait[@]+"${wait[@]}"} dd bs=1 count="$n" <&3 2>/dev/null
}

# -- handshake --------------------------------------------------------------------------

connect() {  # open fd 3 and say hello with capability $1 (none if empty); the answer is in $reply
    if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
        log "cannot connect to $host:$port"
        return 1
    fi
    local greeting
    if IFS= read -r -t "$wait_s" greeting <&3 2>/dev/null &&
        printf 'hello vm:%s%s%s\n' "$vm" "${1:+ capabilities=$1}" "${token:+ token=$token}" >&3 2>/dev/null &&
        IFS= read -r -t "$wait_s" reply <&3 2>/dev/null; then
        reply=${reply%$'\r'}
        return 0
    fi
    log "handshake with $host:$port failed"
    exec 3>&-
    return 1
}

open_session() {  # connect in bus mode; fd 3 then carries frames
    connect bus-v1 || return 1
    case $reply in
        "ok session="*) ;;
        *) log "$host:$port refused: $reply"; exec 3>&-; return 1 ;;
    esac
}

# -- modes ------------------------------------------------------------------------------

run_publish() {
    [ "$payload" != - ] || payload=$(</dev/stdin)
    [ -n "$payload" ] || usage_error "publish needs --payload JSON"
    local frame="{\"type\":\"publish\",\"topic\":$(json_string "$topic"),\"payload\":$payload}"
    fits "$frame" || exit 2
    open_session || exit 1
    send_frame "$frame" || exit 1
    while frame=$(read_frame "$wait_s"); do
        case $frame in
            *'"ack":"publish"'*'"status":"ok"'*) printf '%s\n' "$frame"; exit 0 ;;
            *'"ack":"publish"'* | '{"type":"error"'*) log "refused: $frame"; exit 1 ;;
        esac  # anything else is not the answer
    done
    log "no publish ack within ${wait_s}s, or the connection closed"
    exit 1
}

run_ping() {
    connect "" || exit 1
    exec 3>&-
    [ "$reply" = ok ] || { log "$host:$port answered: $reply"; exit 1; }
    echo ok
}

reader() {  # the only reader of the socket: dispatches every frame until the connection ends
    local frame topic
    while frame=$(read_frame); do
        case $frame in
            '{"type":"message"'*) printf '%s\n' "$frame" ;;
            *'"ack":"subscribe","status":"ok"'*)
                topic=${frame#*'"topic":"'}
                log "subscribed to ${topic%'"}'}"
                ;;
            *'"status":"error"'* | '{"type":"error"'*) log "refused: $frame" ;;
        esac  # ok acks of heartbeats and publishes need nothing
    done
}

writer() {  # the only writer while the reader runs: stdin frames, and a heartbeat after $heartbeat s without one
    local line pending= status
    while :; do
        if [ "$stdin_json" = 1 ]; then
            IFS= read -r -t "$heartbeat" line
            status=$?
            if [ "$status" -gt 128 ]; then
                pending+=$line  # a timeout keeps what it read of an unfinished line
            else
                line=$pending$line pending=
                if [ -n "$line" ] && fits "$line"; then
                    send_frame "$line" || return
                fi
                [ "$status" -eq 0 ] || stdin_json=0  # the end of stdin: heartbeats only
                continue
            fi
        else
            read -r -t "$heartbeat" -u "$idle" _  # waits $heartbeat s: nothing ever comes on $idle
        fi
        send_frame '{"type":"heartbeat"}' || return
    done
}

serve() {  # one connection: subscribe, then read and write until it ends
    local topic
    for topic in ${subscriptions[@]+"${subscriptions[@]}"}; do
        send_frame "{\"type\":\"subscribe\",\"topic\":$(json_string "$topic")}" || break
    done
    set -m  # the reader gets a process group of its own, so stopping it stops its dd too
    reader &
    reader_pid=$!
    set +m
    writer <&0 &  # <&0: a background job would otherwise read /dev/null
    writer_pid=$!
    wait "$reader_pid"
    stop_session
}

stop_session() {
    [ -z "$writer_pid" ] || kill "$writer_pid" 2>/dev/null
    [ -z "$reader_pid" ] || kill -- "-$reader_pid" 2>/dev/null
    writer_pid= reader_pid=
    exec 3>&-
}

run_agent() {
    local delay_ms=$backoff_ms
    reader_pid= writer_pid=
    trap 'exit 0' TERM INT
    trap stop_session EXIT
    while :; do
        if open_session; then
            log "connected to $host:$port as vm:$vm (session ${reply#ok session=})"
            delay_ms=$backoff_ms
            serve
            log "connection to $host:$port lost; reconnecting in $(seconds "$delay_ms")s"
        fi
        read -r -t "$(seconds "$delay_ms")" -u "$idle" _  # the back-off
        delay_ms=$((delay_ms * 2 > backoff_max_ms ? backoff_max_ms : delay_ms * 2))
    done
}

# -- settings ---------------------------------------------------------------------------

to_ms() {  # seconds with up to 3 decimals -> milliseconds
    case $1 in '' | *[!0-9.]* | *.*.* | .) usage_error "not a number of seconds: $1" ;; esac
    local whole=${1%%.*} frac=
    case $1 in *.*) frac=${1#*.} ;; esac
    frac=${frac}000
    echo $((10#${whole:-0} * 1000 + 10#${frac:0:3}))
}

seconds() { printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)); }

read_conf() {  # BUS_* lines of a shell-style conf file into conf_BUS_*
    local line key value
    [ -r "$1" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#"${line%%[![:space:]]*}"}
        line=${line#export }
        case $line in BUS_HOST=* | BUS_PORT=* | BUS_VM_NAME=* | BUS_TOKEN=*) ;; *) continue ;; esac
        key=${line%%=*} value=${line#*=}
        case $value in  # what a shell would assign: a quoted string, else one word (then a comment)
            \"*) value=${value#\"} value=${value%%\"*} ;;
            \'*) value=${value#\'} value=${value%%\'*} ;;
            *) value=${value%%[[:space:]]*} ;;
        esac
        printf -v "conf_$key" '%s' "$value"
    done <"$1"
}

mode=${1:-}
case $mode in
    publish | agent | ping) shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac
opt_host= opt_port= opt_vm= opt_token= wait_s=10 topic=broadcast payload= stdin_json=0 heartbeat=25 backoff=1 backoff_max=30
subscriptions=()
while [ $# -gt 0 ]; do
    case $1 in
        --stdin-json) stdin_json=1; shift; continue ;;
        -h | --help) usage; exit 0 ;;
        --host | --port | --vm | --token | --timeout | --topic | --payload | --subscribe | --heartbeat | --backoff | \
            --backoff-max)
            [ $# -ge 2 ] || usage_error "$1 needs a value" ;;
        *) usage_error "unknown option $1 (see --help)" ;;
    esac
    case $1 in
        --host) opt_host=$2 ;;
        --port) opt_port=$2 ;;
        --vm) opt_vm=$2 ;;
        --token) opt_token=$2 ;;
        --timeout) wait_s=$2 ;;
        --topic) topic=$2 ;;
        --payload) payload=$2 ;;
        --subscribe) subscriptions+=("$2") ;;
        --heartbeat) heartbeat=$2 ;;
        --backoff) backoff=$2 ;;
        --backoff-max) backoff_max=$2 ;;
    esac
    shift 2
done

conf_BUS_HOST= conf_BUS_PORT= conf_BUS_VM_NAME= conf_BUS_TOKEN=
read_conf "${CASTRA_HANDSHAKE_CONF:-/etc/conf.d/castra-handshake}"
host=${opt_host:-${BUS_HOST:-${conf_BUS_HOST:-10.0.2.2}}}
port=${opt_port:-${BUS_PORT:-${conf_BUS_PORT:-7070}}}
vm=${opt_vm:-${BUS_VM_NAME:-${conf_BUS_VM_NAME:-${HOSTNAME%%.*}}}}
vm=${vm#vm:}
token=${opt_token:-${BUS_TOKEN:-$conf_BUS_TOKEN}}
case $port in '' | *[!0-9]*) usage_error "invalid port: $port" ;; esac
case $wait_s in '' | *[!0-9.]* | *.*.*) usage_error "invalid --timeout: $wait_s (seconds)" ;; esac
heartbeat_ms=$(to_ms "$heartbeat") && backoff_ms=$(to_ms "$backoff") && backoff_max_ms=$(to_ms "$backoff_max") ||
    exit 2
[ "$heartbeat_ms" -ge 1 ] && [ "$backoff_ms" -ge 1 ] && [ "$backoff_max_ms" -ge "$backoff_ms" ] ||
    usage_error "--heartbeat and --backoff must be > 0, and --backoff-max >= --backoff"

trap '' PIPE            # a write to a dropped connection fails instead of killing the agent
exec {idle}<> <(:)      # a pipe nothing is written to: `read -t S -u $idle` waits S seconds

case $mode in
    publish) run_publish ;;
    agent) run_agent ;;
    ping) run_ping ;;
esac
