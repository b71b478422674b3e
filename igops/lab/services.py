"""The lab's other daemons: Redis, memcached, PgBouncer, munin-node, gunicorn and nginx.

Each runs in the foreground of its own session, as its usual system user, with its files under
its host's directory. Files that igops tools own after the first `lab up` (PgBouncer's
[databases] file, rewritten by failovers; nginx's upstream file, rewritten by deploys; the
app's releases) are written only when missing, so a later `lab up` does not undo them.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from igops.lab import aws, files, proc
from igops.lab.credentials import Credentials
from igops.lab.state import (
    APP_PORT,
    AWS_REGION,
    CLUSTERS,
    DIRECTORY_CLUSTER,
    LB_PORT,
    MARKER_ENV,
    MEMCACHED_PORT,
    MOTO,
    MUNIN_PORT,
    PGBOUNCER_PORT,
    PHOTO_BUCKET,
    POSTGRES_PORT,
    REDIS_MASTER,
    REDIS_PORT,
    Paths,
    host,
    with_role,
)
from igops.remote import SYSTEM_PATH

MUNIN_PLUGINS = ("cpu", "load", "memory", "uptime")
MUNIN_PLUGIN_LIBRARY = Path("/usr/share/munin/plugins")
PGBOUNCER_ADMIN = "pgbouncer"
APP_USER = "www-data"
GUNICORN_WORKERS = 2
GUNICORN_THREADS = 4
# nginx drops an idle upstream connection a second before gunicorn would: a POST sent on a
# connection gunicorn is closing fails with a reset, and nginx does not retry non-idempotent
# requests.
GUNICORN_KEEPALIVE_S = 5
NGINX_UPSTREAM_KEEPALIVE_S = GUNICORN_KEEPALIVE_S - 1


# --- Redis -----------------------------------------------------------------------------------


def redis_daemon(paths: Paths, name: str, master: str | None) -> proc.Daemon:
    from igops.redisops import with_replicaof

    lab_host = host(name)
    directory = paths.host_dir(name) / "redis"
    data_dir = paths.mount_point(name, "data")
    config = directory / "redis.conf"
    # In the form `igops redis switchover` writes, so that a lab up after one restarts nothing.
    text = with_replicaof(
        files.render("redis.conf", host=name, address=lab_host.address, port=REDIS_PORT, data_dir=data_dir),
        (str(host(master).address), REDIS_PORT) if master else None,
    )
    files.write_file(config, text, owner="redis")
    files.chown(data_dir, "redis")
    return proc.Daemon(
        f"redis on {name}",
        ("/usr/bin/redis-server", str(config)),
        directory / "redis.pid",
        directory / "redis.log",
        endpoint=(lab_host.address, REDIS_PORT),
        user="redis",
        cwd=data_dir,
        config_files=(config,),
        without_live_settings=lambda config_text: with_replicaof(config_text, None),
    )


def redis_daemons(paths: Paths) -> list[proc.Daemon]:
    master = configured_redis_master(paths)
    return [
        redis_daemon(paths, lab_host.name, None if lab_host.name == master else master)
        for lab_host in with_role("redis")
    ]


def configured_redis_master(paths: Paths) -> str:
    """The member the config files make master. `igops redis switchover` and `failover` rewrite
    those files, so a restarted lab keeps the roles they left, as its Postgres does; going back to
    the first master would make the app's endpoint a replica."""
    from igops.redisops import configured_master

    configs = {lab_host.name: paths.host_dir(lab_host.name) / "redis" / "redis.conf" for lab_host in with_role("redis")}
    if not all(config.exists() for config in configs.values()):
        return REDIS_MASTER
    masters = [name for name, config in configs.items() if configured_master(config.read_text()) is None]
    if len(masters) != 1:
        raise proc.LabError(
            f"redis: the config files make {' and '.join(masters) or 'no member'} master "
            f"({', '.join(str(config) for config in configs.values())})",
            "leave a `replicaof` line in every file but the master's, then `igops lab up`",
        )
    return masters[0]


def wait_for_replication(timeout: float = 30) -> None:
    """Until every Redis replica's link to its master is up (a replica answers at once, but
    serves stale or no data until its first sync)."""
    from igops.redisops import connect

    deadline = time.monotonic() + timeout
    for lab_host in with_role("redis"):
        client = connect(lab_host.address, REDIS_PORT, None, 2)
        try:
            while True:
                role = client.role()
                if role[0] == "master" or role[3] == "connected":
                    break
                if time.monotonic() > deadline:
                    raise proc.LabError(
                        f"redis on {lab_host.name}: replication link still {role[3]!r} after {timeout:g} s"
                    )
                time.sleep(0.1)
        finally:
            client.close()


# --- memcached -------------------------------------------------------------------------------


def memcached_daemon(paths: Paths) -> proc.Daemon:
    lab_host = with_role("memcached")[0]
    directory = paths.host_dir(lab_host.name) / "memcached"
    return proc.Daemon(
        f"memcached on {lab_host.name}",
        ("/usr/bin/memcached", "-l", lab_host.address, "-p", str(MEMCACHED_PORT), "-U", "0", "-m", "64", "-c", "1024"),
        directory / "memcached.pid",
        directory / "memcached.log",
        endpoint=(lab_host.address, MEMCACHED_PORT),
        user="memcache",
    )


# --- PgBouncer -------------------------------------------------------------------------------


def pgbouncer_daemon(paths: Paths, credentials: Credentials, primaries: dict[str, str]) -> proc.Daemon:
    lab_host = with_role("pgbouncer")[0]
    directory = paths.pgbouncer_dir()
    socket_dir = directory / "run"
    socket_dir.mkdir(parents=True, exist_ok=True)
    files.chown(directory, "postgres")
    files.chown(socket_dir, "postgres")
    if not paths.databases_file().exists():
        entries = []
        for cluster in CLUSTERS:
            address = host(primaries[cluster.name]).address
            entries += [
                f"{name} = host={address} port={POSTGRES_PORT} dbname={database}"
                for name, database in pgbouncer_databases(cluster.name).items()
            ]
        files.write_file(
            paths.databases_file(), files.render("databases.ini", entries="\n".join(entries)), owner="postgres"
        )
    files.write_file(
        directory / "userlist.txt",
        f'"app" "{credentials.app_password}"\n"{PGBOUNCER_ADMIN}" "{credentials.pgbouncer_password}"\n',
        mode=0o600,
        owner="postgres",
    )
    config = directory / "pgbouncer.ini"
    files.write_file(
        config,
        files.render(
            "pgbouncer.ini",
            address=lab_host.address,
            port=PGBOUNCER_PORT,
            socket_dir=socket_dir,
            databases_file=paths.databases_file(),
            userlist=directory / "userlist.txt",
            admin_user=PGBOUNCER_ADMIN,
            log_file=directory / "pgbouncer.log",
        ),
        owner="postgres",
    )
    return proc.Daemon(
        f"pgbouncer on {lab_host.name}",
        ("/usr/sbin/pgbouncer", str(config)),
        directory / "pgbouncer.pid",
        directory / "pgbouncer.out",
        endpoint=(lab_host.address, PGBOUNCER_PORT),
        user="postgres",
        config_files=(config, directory / "userlist.txt"),
    )


def pgbouncer_databases(cluster: str) -> dict[str, str]:
    """PgBouncer's databases that lead to the cluster's primary -> the database each reaches."""
    return {cluster: "instagram", **({"directory": "directory"} if cluster == DIRECTORY_CLUSTER else {})}


def route_pgbouncer(paths: Paths, repaired: dict[str, str]) -> bool:
    """Point PgBouncer's databases file at the primaries the lab promoted itself (`repaired`:
    cluster -> node); True when the file changed, and a running PgBouncer must RELOAD it.
    Failovers keep the file right; only a repair by the lab leaves it naming a member that is no
    longer the primary."""
    from igops.postgres import repoint_databases

    if not repaired or not paths.databases_file().exists():
        return False
    text = updated = paths.databases_file().read_text()
    for cluster, primary in repaired.items():
        updated = repoint_databases(
            updated, set(pgbouncer_databases(cluster)), str(host(primary).address), POSTGRES_PORT
        )
    if updated == text:
        return False
    files.write_file(paths.databases_file(), updated, owner="postgres")
    return True


# --- munin-node ------------------------------------------------------------------------------


def munin_daemon(paths: Paths, name: str) -> proc.Daemon:
    lab_host = host(name)
    directory = paths.munin_dir(name)
    plugins, plugin_conf = directory / "plugins", directory / "plugin-conf.d"
    for path in (plugins, plugin_conf):
        path.mkdir(parents=True, exist_ok=True)
    if not any(plugins.iterdir()):
        for plugin in MUNIN_PLUGINS:
            (plugins / plugin).symlink_to(MUNIN_PLUGIN_LIBRARY / plugin)
    pid_file = directory / "munin-node.pid"
    config = directory / "munin-node.conf"
    files.write_file(
        config,
        files.render(
            "munin-node.conf",
            host=name,
            address=lab_host.address,
            port=MUNIN_PORT,
            log_file=directory / "munin-node.log",
            pid_file=pid_file,
        ),
    )
    # Debian's munin-node has no option for its plugin directories, so each node gets its own
    # mount namespace with this host's directories bound over the system ones. Slave
    # propagation lets the lab's unmounts reach the namespace only where the root mount is
    # shared; where it is private (containers), the namespace's copies of the lab's volume mounts
    # would keep each filesystem mounted after the lab unmounts it (an in-place rebuild swapping
    # a volume), and its loop device attached. munin reads none of them: they go, deepest first.
    script = (
        "for m in $(awk -v top=\"$4/\" 'index($5, top) == 1 {print $5}' /proc/self/mountinfo | sort -r); do "
        'umount -l "$m"; done; '
        'mount --bind "$1" /etc/munin/plugins && mount --bind "$2" /etc/munin/plugin-conf.d '
        '&& exec /usr/sbin/munin-node --config "$3" --foreground'
    )
    argv = (
        "unshare",
        "--mount",
        "--propagation",
        "slave",
        "--",
        "/bin/sh",
        "-c",
        script,
        "munin-node",
        str(plugins),
        str(plugin_conf),
        str(config),
        str(paths.root),
    )
    files.write_file(
        directory / "restart",
        files.render(
            "munin-restart.sh",
            host=name,
            path=SYSTEM_PATH,
            marker_env=MARKER_ENV,
            state_root=paths.root,
            pid_file=pid_file,
            command=shlex.join(argv),
            log_file=directory / "munin-node.out",
            address=lab_host.address,
            port=MUNIN_PORT,
        ),
        mode=0o755,
    )
    return proc.Daemon(
        f"munin-node on {name}",
        argv,
        pid_file,
        directory / "munin-node.out",
        endpoint=(lab_host.address, MUNIN_PORT),
        writes_pid_file=True,
        config_files=(config,),
    )


# --- the app: venv, release, gunicorn --------------------------------------------------------


def app_venv(paths: Paths, requirements: Path | None = None) -> Path:
    """A virtualenv with the app's requirements, built once per requirements.txt content. Every
    app host's shared/venvs/<hash> links to it, as if the machine image came with it; a release
    with other requirements gets its own, built on the host by `igops deploy`."""
    requirements = requirements or paths.app_source / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    venv = paths.venvs / digest
    ready = venv / ".igops-ready"
    if ready.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    paths.venvs.mkdir(parents=True, exist_ok=True)
    proc.run([_base_python(), "-m", "venv", venv], timeout=120)
    proc.run(
        [venv / "bin" / "pip", "install", "--quiet", "--disable-pip-version-check", "-r", requirements], timeout=600
    )
    ready.write_text(str(requirements) + "\n")
    return venv


def _base_python() -> str:
    """The system's interpreter, which the app's user can run (igops' own may sit in a home
    directory only root can enter)."""
    system = Path("/usr/bin/python3")
    if system.exists():
        return str(system)
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}")


def _source_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def first_release_id() -> str:
    """The id of the release `lab up` makes on app hosts that have none: one id for all of them,
    as one deploy would give them. (Taken host by host, the ids straddled a second now and then,
    and a canary analysis then found no app server on the canary's release to compare with.)"""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime())


def ensure_release(paths: Paths, name: str, venv: Path, release_id: str) -> Path:
    """The Capistrano layout: releases/<id>, an atomically switched `current`, shared/.
    A first release, `release_id`, is made from the app's source only when `current` does not
    exist yet. Each release links `venv` to shared/venvs/<requirements hash>, as igops deploys do."""
    root = paths.app_root(name)
    current = root / "current"
    for directory in (root / "releases", root / "shared" / "log", root / "shared" / "venvs"):
        directory.mkdir(parents=True, exist_ok=True)
    if current.exists():
        return _link_venv(paths, root, current.resolve(), venv)
    release = root / "releases" / release_id
    shutil.rmtree(release, ignore_errors=True)
    shutil.copytree(
        paths.app_source, release / "app", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "test_*.py")
    )
    (release / "REVISION").write_text(_source_digest(paths.app_source) + "\n")
    _link_venv(paths, root, release, venv)
    link = root / f".current.{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(release)
    os.replace(link, current)
    return release


def _link_venv(paths: Paths, root: Path, release: Path, venv: Path) -> Path:
    if (release / "venv").is_symlink():
        return release
    requirements = release / "app" / "requirements.txt"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]
    host_venv = root / "shared" / "venvs" / digest
    if not host_venv.is_symlink() and not host_venv.exists():
        host_venv.symlink_to(venv if venv.name == digest else app_venv(paths, requirements))
    (release / "venv").symlink_to(Path("..", "..", "shared", "venvs", digest))
    return release


def gunicorn_daemon(paths: Paths, name: str, venv: Path, credentials: Credentials, release_id: str) -> proc.Daemon:
    """App host `name`'s gunicorn, on its current release (`release_id` when it has none yet)."""
    lab_host = host(name)
    root = paths.app_root(name)
    shared = root / "shared"
    ensure_release(paths, name, venv, release_id)
    password_file = shared / "app-pg-password"
    files.write_file(password_file, credentials.app_password + "\n", mode=0o600, owner=APP_USER)
    pgbouncer = with_role("pgbouncer")[0]
    config = files.render(
        "app.toml",
        host=name,
        pgbouncer_address=pgbouncer.address,
        pgbouncer_port=PGBOUNCER_PORT,
        password_file=password_file,
        redis_nodes=", ".join(f'"{node.address}:{REDIS_PORT}"' for node in with_role("redis")),
        memcached_servers=", ".join(f'"{node.address}:{MEMCACHED_PORT}"' for node in with_role("memcached")),
        s3_endpoint=f"http://{MOTO[0]}:{MOTO[1]}",
        region=AWS_REGION,
        bucket=PHOTO_BUCKET,
        stats_path=shared / "stats.db",
    )
    pid_file = shared / "gunicorn.pid"
    files.write_file(shared / "app.toml", config, owner=APP_USER)
    files.chown(shared, APP_USER, recursive=True)
    # The interpreter is found through `current`, so its site-packages are the current
    # release's virtualenv: after a HUP the new workers import the new release's dependencies.
    argv = (
        str(root / "current" / "venv" / "bin" / "python"),
        "-m",
        "gunicorn",
        "--bind",
        f"{lab_host.address}:{APP_PORT}",
        "--workers",
        str(GUNICORN_WORKERS),
        "--threads",
        str(GUNICORN_THREADS),
        "--worker-class",
        "gthread",
        # HUP re-reads `current`: the deploy's switch takes effect without a restart.
        "--chdir",
        str(root / "current"),
        "--pid",
        str(pid_file),
        "--name",
        f"app-{name}",
        "--control-socket",
        str(shared / "gunicorn.ctl"),
        "--access-logfile",
        str(shared / "log" / "access.log"),
        "--error-logfile",
        str(shared / "log" / "error.log"),
        "--timeout",
        "30",
        "--graceful-timeout",
        "10",
        "--keep-alive",
        str(GUNICORN_KEEPALIVE_S),
        "app.wsgi:application",
    )
    env = {**aws.AWS_ENV, "IGOPS_APP_CONFIG": str(shared / "app.toml"), "PYTHONDONTWRITEBYTECODE": "1"}
    return proc.Daemon(
        f"gunicorn on {name}",
        argv,
        pid_file,
        shared / "log" / "gunicorn.out",
        endpoint=(lab_host.address, APP_PORT),
        user=APP_USER,
        env=tuple(env.items()),
        cwd=root,
        writes_pid_file=True,
        health_path="/health",
        config_files=(shared / "app.toml", password_file),
    )


# --- nginx -----------------------------------------------------------------------------------


def nginx_daemon(paths: Paths) -> proc.Daemon:
    lab_host = with_role("lb")[0]
    directory = paths.nginx_dir()
    for temporary in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / temporary).mkdir(parents=True, exist_ok=True)
    files.chown(directory / "tmp", "www-data", recursive=True)
    if not paths.upstream_file().exists():
        servers = "\n".join(
            f"    server {node.address}:{APP_PORT} max_fails=2 fail_timeout=5s;" for node in with_role("app")
        )
        files.write_file(
            paths.upstream_file(),
            files.render("upstream.conf", servers=servers, keepalive_timeout=NGINX_UPSTREAM_KEEPALIVE_S),
        )
    pid_file = directory / "nginx.pid"
    config = directory / "nginx.conf"
    files.write_file(
        config,
        files.render(
            "nginx.conf",
            pid_file=pid_file,
            dir=directory,
            upstream_file=paths.upstream_file(),
            address=lab_host.address,
            port=LB_PORT,
        ),
    )
    proc.run(["/usr/sbin/nginx", "-t", "-q", "-c", config, "-e", directory / "error.log"])
    return proc.Daemon(
        f"nginx on {lab_host.name}",
        ("/usr/sbin/nginx", "-c", str(config), "-e", str(directory / "error.log")),
        pid_file,
        directory / "nginx.out",
        endpoint=(lab_host.address, LB_PORT),
        writes_pid_file=True,
        health_path="/health",
        config_files=(config,),
    )


def nginx_test_command(paths: Paths) -> str:
    config = paths.nginx_dir() / "nginx.conf"
    return f"/usr/sbin/nginx -t -q -c {config} -e {paths.nginx_dir() / 'error.log'}"


def nginx_reload_command(paths: Paths) -> str:
    config = paths.nginx_dir() / "nginx.conf"
    return f"/usr/sbin/nginx -c {config} -e {paths.nginx_dir() / 'error.log'} -s reload"
