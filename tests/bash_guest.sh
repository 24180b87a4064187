#!/usr/bin/env bash
# A guest with nothing but bash /dev/tcp, dd and od, as existing guest images have:
# handshake, publish, heartbeat, printing each reply on its own line.
# Usage: bash_guest.sh PORT VM
set -eu
port=$1 vm=$2
exec 3<>"/dev/tcp/127.0.0.1/$port"

read -r greeting <&3
echo "greeting: $greeting"
printf 'hello vm:%s capabilities=bus-v1\n' "$vm" >&3
read -r reply <&3
echo "handshake: $reply"
case "$reply" in "ok session="*) ;; *) exit 1 ;; esac

send_frame() {  # $1: JSON body (ASCII): 4-byte big-endian length, then the body
    local n=${#1}
    printf "$(printf '\\x%02x' $((n >> 24 & 255)) $((n >> 16 & 255)) $((n >> 8 & 255)) $((n & 255)))%s" "$1" >&3
}

read_frame() {
    local b
    b=($(dd bs=1 count=4 <&3 2>/dev/null | od -An -tu1))
    local n=$(((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]))
    dd bs=1 count="$n" <&3 2>/dev/null
    echo
}

send_frame '{"type":"publish","topic":"vm:'"$vm"'","payload":{"from":"bash"}}'
ack=$(read_frame)
echo "publish: $ack"
case "$ack" in *'"type":"ack"'*'"ack":"publish"'*'"status":"ok"'*) ;; *) exit 2 ;; esac

send_frame '{"type":"heartbeat"}'
ack=$(read_frame)
echo "heartbeat: $ack"
case "$ack" in *'"ack":"heartbeat"'*'"status":"ok"'*) ;; *) exit 3 ;; esac
exec 3>&-
