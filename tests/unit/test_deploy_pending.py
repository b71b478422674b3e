"""`igops deploy pending`: the commits of app/ between the fleet's release and a revision, the
files they change, whether requirements changed, in a real git repository; the fleet's release
as the app servers' surveys give it."""

import subprocess

import pytest

from igops import deploy, deploy_pending
from tests.unit.test_deploy_rollout import app_fleet


class Repo:
    def __init__(self, root):
        self.root = root
        (root / "app").mkdir(parents=True)
        subprocess.run(["git", "init", "-q", str(root)], check=True)

    def commit(self, message, files):
        for name, text in files.items():
            path = self.root / "app" / name
            if text is None:
                path.unlink()
            else:
                path.write_text(text)
        git = ["git", "-C", str(self.root), "-c", "user.email=dev@example.invalid", "-c", "user.name=Dev"]
        subprocess.run([*git, "add", "-A", "."], check=True)
        subprocess.run([*git, "commit", "-q", "-m", message], check=True)
        return subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    return Repo(tmp_path / "repo")


def fleet_on(app, release, revision=None, content=None, requirements=None, venvs=()):
    info = {"id": release, "revision": revision, "content": content, "requirements": requirements}
    return {
        host.name: deploy.HostReleases(
            host.name, str(host.address), app.root(host), True, current=release, releases=[info], venvs=list(venvs)
        )
        for host in app.hosts
    }


def test_the_commits_files_and_requirements_between_the_fleets_release_and_a_revision(tmp_path, repo):
    base = repo.commit("first", {"views.py": "A = 1\n", "requirements.txt": "Django\n"})
    repo.commit("views: two", {"views.py": "A = 2\n"})
    (repo.root / "README").write_text("docs\n")
    repo.commit("outside the app", {})  # nothing under app/ changes: not listed
    repo.commit("requirements: redis", {"requirements.txt": "Django\nredis\n", "new.py": "B = 1\n"})
    app = app_fleet(tmp_path)
    surveys = fleet_on(app, "R1", revision=base, venvs=[deploy.requirements_hash(b"Django\n")])
    found = deploy_pending.pending(app, repo.root / "app", "HEAD", surveys=surveys)
    assert found.deployed == "R1" and found.base == base and found.base_how == "recorded in the release"
    assert [commit.subject for commit in found.commits] == ["requirements: redis", "views: two"]
    assert found.files == [("A", "new.py"), ("M", "requirements.txt"), ("M", "views.py")]
    assert found.requirements_changed and found.venv_builds == ["app1", "app2", "app3", "app4"]
    assert found.known and found.behind == []
    headline = found.headline()
    assert headline.startswith("2 commits of app/ between R1") and "3 files changed" in headline
    assert "requirements.txt changed: a new virtualenv is built on app1, app2, app3, app4" in headline
    brief = found.brief()
    assert brief["commit_count"] == 2 and brief["commits"][0].endswith(" requirements: redis")
    assert brief["files"] == ["A new.py", "M requirements.txt", "M views.py"] and brief["requirements_changed"]


def test_a_revision_behind_the_fleet_lists_what_it_would_take_away(tmp_path, repo):
    old = repo.commit("first", {"views.py": "A = 1\n"})
    new = repo.commit("second", {"views.py": "A = 2\n"})
    app = app_fleet(tmp_path)
    found = deploy_pending.pending(app, repo.root / "app", old, surveys=fleet_on(app, "R2", revision=new))
    assert found.commits == [] and [c.subject for c in found.behind] == ["second"]
    assert "lacks 1 commit the fleet runs" in found.headline()
    assert found.requirements_changed is False


def test_a_release_built_from_a_working_tree_is_placed_by_its_content(tmp_path, repo):
    first = repo.commit("first", {"views.py": "A = 1\n"})
    content = deploy.content_hash(deploy.read_source(repo.root / "app", "HEAD").files)
    repo.commit("second", {"views.py": "A = 2\n"})
    app = app_fleet(tmp_path)
    found = deploy_pending.pending(app, repo.root / "app", "HEAD", surveys=fleet_on(app, "R1", content=content))
    assert found.base == first and found.base_how == "built from a working tree: found by its content"
    assert [c.subject for c in found.commits] == ["second"]
    lost = deploy_pending.pending(app, repo.root / "app", "HEAD", surveys=fleet_on(app, "R1", content="nope"))
    assert lost.base is None and not lost.known and lost.commits == []
    assert lost.headline().startswith("pending for HEAD: unknown (built from a working tree whose content")


def test_a_working_tree_deploy_lists_its_uncommitted_changes(tmp_path, repo):
    first = repo.commit("first", {"views.py": "A = 1\n"})
    (repo.root / "app" / "views.py").write_text("A = 3\n")
    app = app_fleet(tmp_path)
    found = deploy_pending.pending(app, repo.root / "app", None, surveys=fleet_on(app, "R1", revision=first))
    assert found.rev == "the working tree" and found.uncommitted == ["app/views.py"]
    assert "and 1 uncommitted change" in found.headline()


def test_the_fleets_release_is_the_one_most_hosts_run(tmp_path):
    app = app_fleet(tmp_path)
    surveys = fleet_on(app, "R2")
    surveys["app4"].current = "R1"
    surveys["app3"].reachable = False
    assert deploy_pending.deployed_release(surveys) == ("R2", ["app1", "app2"], {"R1": ["app4"]})
    surveys["app2"].current = "R1"
    assert deploy_pending.deployed_release(surveys)[0] == "R1", "a tie counts from the older release"


def test_git_output_is_parsed_as_written():
    log = "a" * 40 + "\x1f2026-12-01T10:00:00+00:00\x1fDev\x1fviews: two\n"
    assert deploy_pending.parse_log(log) == [
        deploy_pending.Commit("a" * 40, "2026-12-01T10:00:00+00:00", "Dev", "views: two")
    ]
    status = "M\tapp/views.py\nR100\tapp/old.py\tapp/new.py\nA\tapp/sql/x.sql\n"
    assert deploy_pending.parse_name_status(status, "app") == [("M", "views.py"), ("R", "new.py"), ("A", "sql/x.sql")]


def test_a_deploy_without_git_still_runs_without_the_summary(tmp_path):
    source = tmp_path / "plain" / "app"
    source.mkdir(parents=True)
    (source / "views.py").write_text("A = 1\n")
    app = app_fleet(tmp_path)
    tree = deploy.read_source(source, None)
    assert deploy_pending.for_deploy(app, source, None, tree) is None


def test_the_command_says_when_the_fleets_release_cannot_be_placed(tmp_path, repo):
    """No app server answers (nothing listens on these addresses): exit 5, the envelope says why."""
    import json

    from tests.conftest import run_igops
    from tests.unit.inventories import unit_inventory

    repo.commit("first", {"views.py": "A = 1\n"})
    config = unit_inventory(tmp_path, [("app1", "127.0.20.251", "app")])
    done = run_igops("-c", str(config), "deploy", "pending", "--source", str(repo.root / "app"), "--json")
    assert done.returncode == 5, done.stderr
    data = json.loads(done.stdout)["data"]
    assert data["deployed"] is None and data["base_how"] == "no reachable app server has a current release"
    assert data["rev"] == "HEAD" and data["commits"] == []
