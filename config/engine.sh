#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, starting one if needed.
#
# A no-op when `docker info` already works and the tools are there. Otherwise,
# as root on Debian, it installs what is missing of docker.io, busybox-static
# and prometheus (for promtool, which the tests run on /metrics), clears what a
# killed daemon left behind (pid file, socket) and starts dockerd without
# networking of its own: Snapyard's containers run with network "none", and no
# registry is ever used.
set -euo pipefail

log=${SNAPYARD_DOCKERD_LOG:-/var/log/snapyard-dockerd.log}
wait_s=${SNAPYARD_DOCKERD_WAIT:-60}

say() { printf 'engine: %s\n' "$*" >&2; }

engine_answers() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

need_packages() {
    command -v dockerd >/dev/null 2>&1 || echo docker.io
    # The dynamic busybox would not run FROM scratch; the image needs the static one.
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' || echo busybox-static
    # Only for promtool: a test runs `promtool check metrics` on /metrics. Where
    # systemd runs, the package also enables a Prometheus server (port 9090).
    command -v promtool >/dev/null 2>&1 || echo prometheus
}

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    if ! command -v promtool >/dev/null 2>&1; then
        say "promtool is missing (the tests need it): sudo apt-get install prometheus"
    fi
    if engine_answers; then exit 0; fi
    say "no Docker engine answers, and this script can only start one as root on Debian."
    say "Do it yourself: install Docker and Debian's busybox-static (for /bin/busybox), then start the daemon:"
    say "  sudo apt-get install docker.io busybox-static prometheus"
    say "  sudo dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false &"
    say "and make sure your user may use /var/run/docker.sock (e.g. the docker group)."
    exit 1
fi

mapfile -t missing < <(need_packages | sed '/^$/d')
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if engine_answers; then exit 0; fi

# A daemon killed with SIGKILL leaves its pid file and socket; dockerd refuses
# to start over a live-looking pid file, and a stale socket fools clients.
pidfile=/var/run/docker.pid
if [ -f "$pidfile" ] && ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    say "removing stale $pidfile"
    rm -f "$pidfile"
fi
if [ -f "$pidfile" ]; then
    say "dockerd is running (pid $(cat "$pidfile")) but does not answer yet; waiting"
else
    rm -f /var/run/docker.sock
    for stale in /var/run/docker/containerd/containerd.pid /run/docker/containerd/containerd.pid; do
        if [ -f "$stale" ] && ! kill -0 "$(cat "$stale")" 2>/dev/null; then rm -f "$stale"; fi
    done
    mkdir -p "$(dirname "$log")"
    say "starting dockerd (log: $log)"
    nohup dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
        >>"$log" 2>&1 </dev/null &
fi

for _ in $(seq 1 "$wait_s"); do
    if engine_answers; then say "engine ready"; exit 0; fi
    sleep 1
done
say "dockerd did not answer within ${wait_s}s. The last lines of $log:"
tail -n 20 "$log" >&2 || true
exit 1
