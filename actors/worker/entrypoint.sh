#!/bin/sh
# Snapyard's demo worker. Like a real agent worker it pays a setup cost once
# (think: clone, install dependencies) and keeps the result in /workspace, so
# a container started from a snapshot finds the marker and skips the setup.
# SIGTERM ends it promptly: the sleeps run in the background and are waited on.
#
# The job's env is already exported when this runs: Snapyard's env helper
# (actors/helper/snapyard-init) is every worker's entrypoint and execs this
# one, so this image, like any other, needs nothing of Snapyard's.
set -eu

marker=/workspace/.snapyard-setup-done

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
