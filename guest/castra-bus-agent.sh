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
      each stdin line as a frame (at the end of stdin: exit 0 once their acks are in, each
      waited for at most --timeout s); exit 0 on SIGTERM or Ctrl-C
  castra-bus-agent.sh ping                                  handshake only; exit 0 on "ok"

Every mode also takes --host, --port, --vm, --token and --timeout S (to wait for the
handshake, and for an ack where `timeout` is installed; default 10); without them: $BUS_HOST,
$BUS_PORT, $BUS_VM_NAME and $BUS_TOKEN, else the same names in
/etc/conf.d/castra-handshake (another file: $CASTRA_HANDSHAKE_CONF), else 10.0.2.2,
7070, the short hostname and no token (a token is for hosts with an identities file).
A VM name has 1..128 printable characters, no whitespace, and is not "host".

examples:
  castra-bus-agent.sh publish --topic broadcast --payload '{"event":"booted"}'
  castra-bus-agent.sh agent --subscribe broadcast --subscribe "vm:$(hostname)"

exit status (the same for castra-guest):
  0    ok: an ok ack (publish), "ok" (ping); agent: stopped by SIGTERM or SIGINT,
       or its stdin ended (--stdin-json)
  1    the host refused (handshake error, error ack) or gave no ack within
       --timeout: not delivered, or (connection lost) not known
  2    usage or bad input: options, vm name, port, --payload not JSON, too large
  3    cannot connect: no TCP connection to the host's port
  130  publish or ping interrupted by Ctrl-C (SIGINT); 143 by SIGTERM
EOF


MAX_FRAME=65536
MAX_NAME=128
# Exit statuses: one table with castra-guest (USAGE, README "Guests").
EXIT_REFUSED=1 EXIT_USAGE=2 EXIT_UNREACHABLE=3

log() { printf 'castra-bus-agent: %s\n' "$*" >&2; }
usage() { printf '%s\n' "$USAGE"; }
usage_error() { log "$*"; exit "$EXIT_USAGE"; }

check_vm_name() {  # the router's rules (PROTOCOL.md 2.2) with castra-guest's messages, word for word
    local name=$1 chars
    [ -n "$name" ] || usage_error "missing vm name"
    chars=${name//[$'\x80'-$'\xbf']/}  # without UTF-8 continuation bytes: one byte per character
    [ "${#chars}" -le "$MAX_NAME" ] || usage_error "vm name too long (${#chars} characters, max $MAX_NAME)"
    # ASCII whitespace and controls, then in UTF-8: C1 controls, NBSP, soft hyphen,
    # U+1680, U+2000-U+200F, U+2028-U+202F, U+205F-U+206F, U+3000, U+FEFF. Rarer
    # characters the router refuses (unassigned, private use) get its `invalid vm name`.
    case $name in
        *[[:space:][:cntrl:]]* | *$'\xc2'[$'\x80'-$'\xa0']* | *$'\xc2\xad'* | *$'\xe1\x9a\x80'* | \
            *$'\xe2\x80'[$'\x80'-$'\x8f'$'\xa8'-$'\xaf']* | *$'\xe2\x81'[$'\x9f'-$'\xaf']* | *$'\xe3\x80\x80'* | \
            *$'\xef\xbb\xbf'*)
            usage_error "invalid vm name '$name': no whitespace or control characters" ;;
    esac
    [ "${name,,}" != host ] || usage_error "reserved vm name '$name'"
}

interrupted() {  # $1: the signal; end by it, as castra-guest does, so the shell sees 128 + its number
    log "$mode interrupted by SIG$1"
    trap - "$1"
    kill -s "$1" "$$"
}

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
    [ -n "${1:-}" ] && [ -n "$timeout_cmd" ] && wait=($timeout_cmd "$1")
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

connect() {  # open fd 3 and say hello with capability $1 (none if empty); the answer is in $reply.
    # Fails with the exit status that fits: EXIT_UNREACHABLE or EXIT_REFUSED.
    if ! { exec 3<>"/dev/tcp/$host/$port"; } 2>/dev/null; then
        log "cannot connect to $host:$port"
        return "$EXIT_UNREACHABLE"
    fi
    if IFS= read -r -t "$wait_s" reply <&3 2>/dev/null; then  # the greeting, or an error line in its place
        case $reply in
            error:*) ;;
            *) printf 'hello vm:%s%s%s\n' "$vm" "${1:+ capabilities=$1}" "${token:+ token=$token}" >&3 2>/dev/null &&
                IFS= read -r -t "$wait_s" reply <&3 2>/dev/null || reply= ;;
        esac
    else
        reply=
    fi
    reply=${reply%$'\r'}
    case $reply in
        '') log "handshake with $host:$port failed: no answer within ${wait_s}s, or the connection closed" ;;
        error:*) log "$host:$port refused vm:$vm: ${reply#error: }" ;;
        *) return 0 ;;
    esac
    exec 3>&-
    return "$EXIT_REFUSED"
}

open_session() {  # connect in bus mode; fd 3 then carries frames
    connect bus-v1 || return
    case $reply in
        "ok session="*) ;;
        *) log "$host:$port did not open a bus session (reply: $reply)"; exec 3>&-; return "$EXIT_REFUSED" ;;
    esac
}

reason_of() {  # the "reason" of a compact reply (always its last key)
    local reason=${1#*'"reason":"'}
    printf '%s' "${reason%'"}'}"
}

# -- modes ------------------------------------------------------------------------------

run_publish() {
    [ "$payload" != - ] || payload=$(</dev/stdin)
    [ -n "$payload" ] || usage_error "publish needs --payload JSON"
    local frame="{\"type\":\"publish\",\"topic\":$(json_string "$topic"),\"payload\":$payload}"
    fits "$frame" || exit "$EXIT_USAGE"
    open_session || exit
    send_frame "$frame" || exit "$EXIT_REFUSED"
    while frame=$(read_frame "$wait_s"); do
        case $frame in
            *'"ack":"publish"'*'"status":"ok"'*) printf '%s\n' "$frame"; exit 0 ;;
            # only a payload that is not JSON can break the frame this script builds
            '{"type":"error"'*) usage_error "--payload is not JSON: $(reason_of "$frame")" ;;
            *'"ack":"publish"'*) log "publish refused by $host:$port: $(reason_of "$frame")"; exit "$EXIT_REFUSED" ;;
        esac  # anything else is not the answer
    done
    log "no publish ack within ${wait_s}s, or the connection closed"
    exit "$EXIT_REFUSED"
}

run_ping() {
    connect "" || exit
    exec 3>&-
    [ "$reply" = ok ] || { log "$host:$port answered: $reply"; exit "$EXIT_REFUSED"; }
    echo ok
}

reader() {  # the only reader of the socket: dispatches every frame until the connection ends.
    # Every other frame answers one frame sent: once the writer has said how many it sent
    # before the end of stdin (on $stdin_end), the last of their answers ends the agent.
    local frame topic answers=0 expected=
    while frame=$(read_frame); do
        case $frame in
            '{"type":"message"'*) printf '%s\n' "$frame"; continue ;;
            *'"ack":"subscribe","status":"ok"'*)
                topic=${frame#*'"topic":"'}
                log "subscribed to ${topic%'"}'}"
                ;;
            *'"ack":"subscribe","status":"error"'*)
                topic=${frame#*'"topic":"'}
                log "subscription to ${topic%%'","reason"'*} refused: $(reason_of "$frame")"
                ;;
            *'"status":"error"'* | '{"type":"error"'*) log "refused: $frame" ;;
        esac  # ok acks of heartbeats and publishes need nothing
        answers=$((answers + 1))
        [ -n "$expected" ] || ! read -r -t 0 -u "$stdin_end" || read -r -u "$stdin_end" expected
        if [ -n "$expected" ] && [ "$answers" -ge "$expected" ]; then
            log "end of stdin: stopping"
            kill -s USR1 "$$"
        fi
    done
}

writer() {  # the only writer while the reader runs: stdin frames, and a heartbeat after $heartbeat s without one
    local line pending= status sent=$1  # $1: frames serve sent before (its subscribes)
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
                    sent=$((sent + 1))
                fi
                [ "$status" -eq 0 ] || { end_of_stdin "$sent"; return; }
                continue
            fi
        else
            read -r -t "$heartbeat" -u "$idle" _  # waits $heartbeat s: nothing ever comes on $idle
        fi
        send_frame '{"type":"heartbeat"}' || return
        sent=$((sent + 1))
    done
}

end_of_stdin() {  # $1 frames sent: a heartbeat, so that an answer comes after the count is
    # posted, then the reader ends the agent at the last answer, or this after --timeout s
    printf '%s\n' $(($1 + 1)) >&"$stdin_end"
    send_frame '{"type":"heartbeat"}' || return
    read -r -t "$wait_s" -u "$idle" _
    log "end of stdin: not every frame was answered within ${wait_s}s; stopping"
    kill -s USR1 "$$"
}

serve() {  # one connection: subscribe, then read and write until it ends
    local topic subscribes=0
    exec {stdin_end}<> <(:)  # the writer's count of frames sent, once stdin has ended
    for topic in ${subscriptions[@]+"${subscriptions[@]}"}; do
        send_frame "{\"type\":\"subscribe\",\"topic\":$(json_string "$topic")}" || break
        subscribes=$((subscribes + 1))
    done
    set -m  # the reader gets a process group of its own, so stopping it stops its dd too
    reader &
    reader_pid=$!
    set +m
    writer "$subscribes" <&0 &  # <&0: a background job would otherwise read /dev/null
    writer_pid=$!
    wait "$reader_pid"
    stop_session
}

stop_session() {
    [ -z "$writer_pid" ] || kill "$writer_pid" 2>/dev/null
    [ -z "$reader_pid" ] || kill -- "-$reader_pid" 2>/dev/null
    writer_pid= reader_pid=
    exec 3>&-
    [ -z "${stdin_end:-}" ] || exec {stdin_end}>&-
    stdin_end=
}

run_agent() {
    local delay_ms=$backoff_ms
    reader_pid= writer_pid=
    trap 'exit 0' TERM INT USR1  # USR1: the end of stdin, from the reader or the writer
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
    *) usage >&2; exit "$EXIT_USAGE" ;;
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
check_vm_name "$vm"
token=${opt_token:-${BUS_TOKEN:-$conf_BUS_TOKEN}}
case $port in '' | *[!0-9]*) usage_error "invalid port: $port" ;; esac
case $wait_s in '' | *[!0-9.]* | *.*.*) usage_error "invalid --timeout: $wait_s (seconds)" ;; esac
heartbeat_ms=$(to_ms "$heartbeat") && backoff_ms=$(to_ms "$backoff") && backoff_max_ms=$(to_ms "$backoff_max") ||
    exit "$EXIT_USAGE"
[ "$heartbeat_ms" -ge 1 ] && [ "$backoff_ms" -ge 1 ] && [ "$backoff_max_ms" -ge "$backoff_ms" ] ||
    usage_error "--heartbeat and --backoff must be > 0, and --backoff-max >= --backoff"

trap '' PIPE            # a write to a dropped connection fails instead of killing the agent
# coreutils `timeout` puts its command in a process group of its own, out of reach of
# Ctrl-C, unless --foreground (which BusyBox's lacks, and needs not: it keeps the group).
timeout_cmd=
if command -v timeout >/dev/null; then
    timeout_cmd=timeout
    ! timeout --foreground 1 true 2>/dev/null || timeout_cmd="timeout --foreground"
fi
exec {idle}<> <(:)      # a pipe nothing is written to: `read -t S -u $idle` waits S seconds

case $mode in
    publish | ping) trap 'interrupted INT' INT; trap 'interrupted TERM' TERM ;;
esac
case $mode in
    publish) run_publish ;;
    agent) run_agent ;;
    ping) run_ping ;;
esac
