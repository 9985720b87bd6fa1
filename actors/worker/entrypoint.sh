#!/bin/sh
# Snapyard's demo worker. Like a real agent worker it pays a setup cost once
# (think: clone, install dependencies) and keeps the result in /workspace, so
# a container started from a snapshot finds the marker and skips the setup.
# SIGTERM ends it promptly: the sleeps run in the background and are waited on.
set -eu

marker=/workspace/.snapyard-setup-done

# The job's env arrives as a read-only file, never in the container's config:
# Docker copies that config into every image committed from the container.
# One NAME=<base64 of the value> a line (actors/engine/base.py, encode_secret_env).
# Split at the first '=' only: base64 padding is '=' too. The trailing 'x'
# keeps $(...) from eating newlines that end a value.
secrets=/run/snapyard/env
if [ -f "$secrets" ]; then
    while IFS= read -r line; do
        name=${line%%=*}
        [ -n "$name" ] && [ "$name" != "$line" ] || continue
        value=$(printf '%s' "${line#*=}" | base64 -d; printf x)
        export "$name=${value%x}"
    done < "$secrets"
fi
on_term() {
    echo "worker: SIGTERM received, exiting" >&2
    [ -n "${child:-}" ] && kill "$child" 2>/dev/null
    exit 143
}
trap on_term TERM INT

if [ -f "$marker" ]; then
    echo "worker: snapshot reused (${SNAPYARD_SNAPSHOT_REUSE:-unknown}), setup skipped"
else
    seconds="${SNAPYARD_SETUP_SECONDS:-0}"
    echo "worker: setup starting (${seconds}s)"
    sleep "$seconds" &
    child=$!
    wait "$child"
    child=
    mkdir -p /workspace/deps
    date > /workspace/deps/installed-at
    echo "setup by job ${SNAPYARD_JOB_ID:-unknown}" > /workspace/deps/README
    : > "$marker"
    echo "worker: setup done"
fi

if [ "$#" -eq 0 ]; then
    set -- sh -c "echo job done"
fi
exec "$@"
