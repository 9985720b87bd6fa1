#!/usr/bin/env bash
# Install what the cluster's tests and demo run, when it is missing:
# PostgreSQL (server binaries for throwaway servers) and the CNCF registry.
#
# Only the binaries are used: every test starts its own server in a temp dir
# on a loopback port. Where systemd runs, the Debian packages also enable a
# system PostgreSQL cluster and registry; Snapyard never touches them.
set -euo pipefail

say() { printf 'cluster-deps: %s\n' "$*" >&2; }

need_packages() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || echo postgresql
    command -v docker-registry >/dev/null 2>&1 || echo docker-registry
}

mapfile -t missing < <(need_packages | sed '/^$/d')
if [ "${#missing[@]}" -eq 0 ]; then exit 0; fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "the cluster tests need ${missing[*]}; this script installs them only as root on Debian."
    say "Do it yourself:"
    say "  sudo apt-get update && sudo apt-get install ${missing[*]}"
    exit 1
fi

say "installing ${missing[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
