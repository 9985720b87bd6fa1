"""``snapyard doctor``'s cluster checks: the database, the registry, this host's lease.

Run only when ``[cluster] database_url`` is set; each check stands alone, so a
database that is down still lets the registry be checked.
"""

from __future__ import annotations

import time

from actors.clock import SystemClock
from actors.cluster.member import host_id_of, open_cluster_store
from actors.cluster.registry_http import RegistryHttp
from actors.engine.base import EngineError, RegistryUnavailable
from actors.settings import Settings
from actors.store.base import StoreUnavailable
from actors.store.cluster import HostInfo

__all__ = ["Check", "cluster_checks"]

Check = tuple[str, bool, str, str]  # name, ok, what was found, what to do when not ok


def cluster_checks(settings: Settings, now: float | None = None) -> list[Check]:
    now = time.time() if now is None else now
    host_id = host_id_of(settings)
    hosts: list[HostInfo] | None = None
    try:
        store = open_cluster_store(settings, SystemClock())
        try:
            hosts = store.hosts()
        finally:
            store.close()
    except Exception as exc:
        database: Check = (
            "database",
            False,
            exc.problem if isinstance(exc, StoreUnavailable) else str(exc),  # the fix follows
            "start PostgreSQL, or fix [cluster] database_url (SNAPYARD_CLUSTER__DATABASE_URL)",
        )
    else:
        live = sum(1 for h in hosts if h.live(now))
        where = getattr(store, "where", "the cluster database")
        database = ("database", True, f"{where}: {len(hosts)} host(s), {live} live", "")
    return [database, _lease(host_id, hosts, now), _registry(settings)]


def _lease(host_id: str, hosts: list[HostInfo] | None, now: float) -> Check:
    if hosts is None:
        return "lease", False, f"{host_id}: not checked, no database", "fix the database first"
    mine = next((h for h in hosts if h.host_id == host_id), None)
    if mine is None:
        return "lease", True, f"{host_id}: no lease yet (`snapyard run` has not joined)", ""
    if mine.live(now):
        left = mine.lease_until - now
        state = "draining" if mine.draining else "live"
        return "lease", True, f"{host_id}: {state}, lease renewed, {left:.1f}s left", ""
    ago = now - mine.lease_until
    return (
        "lease",
        False,
        f"{host_id}: lease ended {ago:.0f}s ago",
        "fine if `snapyard run` is stopped here; if it runs, it cannot reach the database "
        "(its jobs were rescued by another host): see its log",
    )


def _registry(settings: Settings) -> Check:
    address = settings.cluster.registry
    if not address:
        return (
            "registry",
            True,
            "none: snapshots stay on the host that made them; elsewhere jobs start from base",
            "",
        )
    try:
        registry = RegistryHttp(address)
        registry.ping()
    except EngineError as exc:
        # The error's own advice is the fix column's: say only what is wrong here.
        found = f"does not answer ({exc.detail})" if isinstance(exc, RegistryUnavailable) else exc
        return (
            "registry",
            False,
            f"{address}: {found}",
            "start the registry (docker-registry serve), or fix [cluster] registry",
        )
    return "registry", True, f"{registry.describe()}: answers", ""
