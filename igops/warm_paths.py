"""Where `igops warm` may read and warm: only a host's Postgres data directory and its data
mounts. A captured directory is named by its base (the data directory, a mount by its purpose,
or a plain path) so that its counterpart on another host can be found, and a profile of another
fleet or Postgres cluster is refused before any host is contacted.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING

from igops.errors import RefusedError, UsageError
from igops.profile import ProfileError, Root

if TYPE_CHECKING:
    from igops.inventory import Fleet
    from igops.inventory_model import Host


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _normal(path: str) -> str:
    return "/" + posixpath.normpath(path).lstrip("/")


def data_directory(fleet: Fleet, host: Host) -> str | None:
    if "postgres" not in host.roles:
        return None
    return _normal(fleet.path_for(fleet.model.postgres.data_directory, host))


def allowed_prefixes(fleet: Fleet, host: Host) -> list[str]:
    prefixes = [_normal(mount.path) for mount in host.mounts]
    pgdata = data_directory(fleet, host)
    return prefixes + ([pgdata] if pgdata and not any(_under(pgdata, p) for p in prefixes) else [])


def postgres_cluster_of(fleet: Fleet, host_name: str) -> str | None:
    for name, cluster in fleet.model.postgres.clusters.items():
        if host_name == cluster.primary or host_name in cluster.standbys:
            return name
    return None


def source_roots(fleet: Fleet, host: Host, paths: list[str] | None) -> list[Root]:
    """The directories to capture on `host`, each with how to find it on another host. Only the
    Postgres data directory and the host's data mounts may be captured."""
    pgdata = data_directory(fleet, host)
    if not paths:
        if not pgdata:
            raise UsageError(
                f"{host.name} has no Postgres role, so no default directory",
                "name the directories to capture (under its data mounts)",
            )
        paths = [pgdata]
    roots: list[Root] = []
    for given in paths:
        if not given.startswith("/"):
            raise UsageError(
                f"{given!r} is not an absolute path", f"name a directory on {host.name}, e.g. {pgdata or '/data'}"
            )
        path = _normal(given)
        roots.append(_root(fleet, host, path, pgdata))
    for root in roots:
        for other in roots:
            if root is not other and _under(root.path, other.path):
                raise UsageError(f"{root.path} lies inside {other.path}", "name each directory once")
    return roots


def _root(fleet: Fleet, host: Host, path: str, pgdata: str | None) -> Root:
    if pgdata and _under(path, pgdata):
        return Root(path, "postgres", posixpath.relpath(path, pgdata) if path != pgdata else "")
    mounts = sorted(
        (mount for mount in host.mounts if _under(path, _normal(mount.path))),
        key=lambda mount: len(mount.path),
        reverse=True,
    )
    if not mounts:
        allowed = ", ".join(allowed_prefixes(fleet, host)) or "none in the inventory"
        raise RefusedError(
            f"{path} is outside {host.name}'s data mounts and Postgres data directory",
            f"use a directory under: {allowed}",
        )
    mount = mounts[0]
    base = _normal(mount.path)
    if sum(other.purpose == mount.purpose for other in host.mounts) != 1:
        return Root(path, "path", "")
    return Root(path, f"mount:{mount.purpose}", posixpath.relpath(path, base) if path != base else "")


def target_paths(fleet: Fleet, roots: list[Root], target: Host) -> list[str]:
    """Where each captured directory is on `target`."""
    paths: list[str] = []
    for root in roots:
        if root.base == "postgres":
            pgdata = data_directory(fleet, target)
            if not pgdata:
                raise RefusedError(
                    f"the profile is of a Postgres data directory and {target.name} has no postgres role",
                    "warm a member of the same Postgres cluster",
                )
            paths.append(posixpath.join(pgdata, root.within) if root.within else pgdata)
        elif root.base.startswith("mount:"):
            purpose = root.base.removeprefix("mount:")
            mounts = [mount for mount in target.mounts if mount.purpose == purpose]
            if len(mounts) != 1:
                raise RefusedError(
                    f"{target.name} has {len(mounts)} data mounts with purpose {purpose!r}, "
                    f"so {root.path} has no single counterpart there",
                    "give the mount a unique purpose in the inventory",
                )
            base = _normal(mounts[0].path)
            paths.append(posixpath.join(base, root.within) if root.within else base)
        elif root.base == "path":
            if not any(_under(root.path, prefix) for prefix in allowed_prefixes(fleet, target)):
                raise RefusedError(
                    f"{root.path} is outside {target.name}'s data mounts and Postgres data directory",
                    "warm only under the target's data mounts",
                )
            paths.append(root.path)
        else:
            raise ProfileError(f"the profile's root {root.path} has an unknown base {root.base!r}")
    return paths


def check_target(
    fleet: Fleet, profile_fleet: str, source: str, postgres_cluster: str | None, roots: list[Root], target: Host
) -> None:
    """Refuse, before any host is contacted, a profile the inventory says belongs elsewhere."""
    if profile_fleet != fleet.model.fleet.name:
        raise RefusedError(
            f"the profile is from fleet {profile_fleet!r}, this inventory is {fleet.model.fleet.name!r}",
            "capture a profile in this fleet",
        )
    if any(root.base == "postgres" for root in roots):
        here = postgres_cluster_of(fleet, target.name)
        if here != postgres_cluster:
            raise RefusedError(
                f"the profile is of Postgres cluster {postgres_cluster!r} (captured on {source}); "
                f"{target.name} is {'in cluster ' + repr(here) if here else 'in no cluster'}",
                f"warm {target.name} from a member of its own cluster",
            )
