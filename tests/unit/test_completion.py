"""Shell completion of inventory names, in process and through the real command line."""

import os
import subprocess
import sys
import time

import pytest

from igops.cli import build_command, verbs
from igops.commands import completion
from igops.commands.options import GlobalOptions
from tests.conftest import IGOPS, ROOT
from tests.unit.inventories import unit_inventory

FLEET_SECTIONS = (
    '[postgres.clusters.main]\nprimary = "db1"\nstandbys = ["db2"]\n'
    '[postgres.clusters.pg2]\nprimary = "db3"\nstandbys = []\n'
    '[redis]\nmaster = "redis1"\nreplicas = ["redis2"]\n[shards]\ncount = 24\n'
)


@pytest.fixture
def config(tmp_path):
    return unit_inventory(
        tmp_path,
        [
            ("web1", "127.0.20.250", "app"),
            ("db1", "127.0.20.251", "postgres"),
            ("db2", "127.0.20.252", "postgres"),
            ("db3", "127.0.20.253", "postgres"),
            ("redis1", "127.0.20.254", "redis"),
            ("redis2", "127.0.20.249", "redis"),
        ],
        sections=FLEET_SECTIONS,
    )


class Context:
    """What a completer reads of click's context: the stored global options and the root's -c."""

    def __init__(self, obj=None, params=None, parent=None):
        self.obj, self.params, self.parent = obj, params or {}, parent

    def find_root(self):
        return self if self.parent is None else self.parent.find_root()


COMPLETERS = (
    completion.hosts,
    completion.roles,
    completion.clusters,
    completion.postgres_nodes,
    completion.redis_nodes,
    completion.shards,
)


def another_inventory(tmp_path):
    (tmp_path / "other").mkdir()
    return unit_inventory(tmp_path / "other", [("solo", "127.0.20.250", "app")])


def root_with(config) -> Context:
    return Context(params={"config": str(config)})


def test_each_completer_offers_the_inventorys_names(config):
    ctx = root_with(config)
    assert completion.hosts(ctx, None, "") == ["web1", "db1", "db2", "db3", "redis1", "redis2"]
    assert completion.hosts(ctx, None, "db") == ["db1", "db2", "db3"]
    assert completion.roles(ctx, None, "") == ["app", "postgres", "redis"]
    assert completion.clusters(ctx, None, "") == ["main", "pg2"]
    assert completion.postgres_nodes(ctx, None, "") == ["db1", "db2", "db3"]
    assert completion.redis_nodes(ctx, None, "") == ["redis1", "redis2"]
    assert completion.shards(ctx, None, "2") == ["2", "20", "21", "22", "23"]
    assert len(completion.shards(ctx, None, "")) == 24


def test_shards_default_to_the_inventorys_default_count(tmp_path):
    ctx = root_with(unit_inventory(tmp_path, [("web1", "127.0.20.250", "app")]))
    assert completion.shards(ctx, None, "") == [str(number) for number in range(16)]
    assert completion.clusters(ctx, None, "") == [] and completion.redis_nodes(ctx, None, "") == []


def test_config_after_the_command_wins(tmp_path, config):
    other = another_inventory(tmp_path)
    verb = Context(obj=GlobalOptions(config=str(other)), parent=root_with(config))
    assert completion.hosts(verb, None, "") == ["solo"]
    assert completion.hosts(Context(parent=root_with(config)), None, "web") == ["web1"]


def test_config_from_the_environment(config, monkeypatch):
    monkeypatch.setenv("IGOPS_CONFIG", str(config))
    assert completion.hosts(Context(), None, "red") == ["redis1", "redis2"]


@pytest.mark.parametrize("text", ["", "not [toml"])
def test_a_missing_or_unreadable_inventory_completes_nothing(tmp_path, text):
    path = tmp_path / "igops.toml"
    if text:
        path.write_text(text)
    ctx = root_with(path)
    for complete in COMPLETERS:
        assert complete(ctx, None, "") == []


@pytest.mark.parametrize(
    "text",
    [
        '[[hosts]]\nname = 3\nroles = "app"\n[shards]\ncount = "x"\n',
        "hosts = 3\nshards = 2\npostgres = []\nredis = 'x'\n",
        "[postgres]\nclusters = 1\n[redis]\nreplicas = [1]\n[shards]\ncount = 9000\n",
    ],
)
def test_an_inventory_of_the_wrong_shape_completes_what_it_can(tmp_path, text):
    path = tmp_path / "igops.toml"
    path.write_text(text)
    for complete in COMPLETERS:
        assert all(isinstance(name, str) for name in complete(root_with(path), None, ""))
    assert completion.roles(root_with(path), None, "") in ([], ["app"])


def test_the_verbs_complete_what_they_take():
    attached = {
        (" ".join(path), param.name): param._custom_shell_complete
        for path, verb in verbs(build_command())
        for param in verb.params
        if getattr(param, "_custom_shell_complete", None) is not None
    }
    assert attached[("exec", "host")] is completion.hosts
    assert attached[("hosts", "role")] is completion.roles
    assert attached[("pg switchover", "cluster")] is completion.clusters
    assert attached[("pg switchover", "to")] is completion.postgres_nodes
    assert attached[("redis rejoin", "node")] is completion.redis_nodes
    assert attached[("shard move", "shard")] is completion.shards
    assert attached[("shard move", "to")] is completion.clusters
    assert attached[("warm copy", "to")] is completion.hosts
    assert ("deploy rollback", "to") not in attached and ("deploy run", "source") not in attached


def complete(config, words: str) -> list[str]:
    """What bash would offer after `igops WORDS` (the last word being typed)."""
    env = {
        **os.environ,
        "_IGOPS_COMPLETE": "complete_bash",
        "COMP_WORDS": f"igops {words}",
        "COMP_CWORD": str(len(words.split(" "))),
        "IGOPS_CONFIG": str(config),
    }
    result = subprocess.run([*IGOPS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_completion_through_the_command_line(config, tmp_path):
    assert complete(config, "sn") == ["snapshot"]
    assert complete(config, "pg switchover main --to db") == ["db1", "db2", "db3"]
    assert complete(config, "redis rejoin ") == ["redis1", "redis2"]
    assert complete(config, "exec --role p") == ["postgres"]
    assert complete(config, "shard move 1") == ["1", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19"]
    other = another_inventory(tmp_path)
    assert complete(config, f"-c {other} hosts ") == ["solo"]
    assert complete(config, f"warm capture -c {other} s") == ["solo"]


def test_completing_a_command_name_imports_no_command_module(config):
    code = (
        "import os, sys\n"
        "os.environ.update({'_IGOPS_COMPLETE': 'complete_bash', 'COMP_WORDS': 'igops s', 'COMP_CWORD': '1'})\n"
        "from igops.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in sys.modules if m.startswith('igops.commands.') "
        "and m != 'igops.commands.options'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "LOADED []" in result.stdout and "snapshot" in result.stdout.splitlines(), result.stdout


def test_a_completion_reads_a_large_inventory_quickly(tmp_path):
    hosts = [(f"host{number:04d}", "127.0.20.250", "app") for number in range(2000)]
    ctx = root_with(unit_inventory(tmp_path, hosts))
    started = time.perf_counter()
    assert len(completion.hosts(ctx, None, "host1")) == 1000
    assert time.perf_counter() - started < 1.0
