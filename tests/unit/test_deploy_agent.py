"""The release agent on this machine, exactly as a host runs it (the same command line and
stdin that SSH carries): staging, the atomic switch, history, pruning, and what it refuses."""

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import tarfile
from types import SimpleNamespace

from igops import agent, deploy


def run_agent(args, payload=b""):
    command, prefix = agent.invocation("release", args)
    done = subprocess.run(["sh", "-c", command], input=prefix + payload, capture_output=True, timeout=120)
    return done.returncode, json.loads(done.stdout.decode().strip().splitlines()[-1])


def make_release(tmp_path, release_id, marker="1", requirements=b""):
    source = tmp_path / f"src-{release_id}" / "app"
    source.mkdir(parents=True)
    (source / "views.py").write_text(f"MARKER = {marker!r}\n")
    (source / "requirements.txt").write_bytes(requirements)
    release, tarball = deploy.package(deploy.read_source(source, None), release_id)
    return SimpleNamespace(**dataclasses.asdict(release), tarball=tarball)


def prebuilt_venv(root, requirements=b""):
    """A host whose image already has the virtualenv for these requirements."""
    venv = root / "shared" / "venvs" / deploy.requirements_hash(requirements)
    venv.mkdir(parents=True)
    (venv / ".igops-ready").write_text("prebuilt\n")


def stage(root, release):
    return run_agent(["stage", str(root), release.id, release.sha256, *deploy.SHARED_LINKS], release.tarball)


def switch(root, release_id, keep=5, reload_command="true"):
    return run_agent(["switch", str(root), release_id, str(keep), reload_command, "deploy", "d1"])


def test_stage_then_switch_atomically_with_history(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    (root / "shared" / "app.toml").write_text("")
    first, second = (
        make_release(tmp_path, "20260101000000-aaaaaaa"),
        make_release(tmp_path, "20260101000001-bbbbbbb", "2"),
    )
    for release in (first, second):
        code, answer = stage(root, release)
        assert code == 0 and answer["staged"] == "unpacked" and answer["venv"] == "reused", answer
    release_dir = root / "releases" / second.id
    assert (release_dir / "app" / "views.py").read_text() == "MARKER = '2'\n"
    assert os.readlink(release_dir / "app.toml") == "../../shared/app.toml"
    assert not (release_dir / "log").exists(), "only shared files that exist are linked"
    assert (release_dir / "venv" / ".igops-ready").exists()
    assert not list((root / "releases").glob(".*")), "no staging directory is left behind"

    code, answer = switch(root, first.id, reload_command=f"echo reloaded > {tmp_path / 'reloaded'}")
    assert code == 0 and answer["previous"] is None and answer["reload_exit"] == 0
    assert (tmp_path / "reloaded").read_text() == "reloaded\n"
    code, answer = switch(root, second.id)
    assert code == 0 and answer["previous"] == first.id and answer["switched"]
    assert os.readlink(root / "current") == str(root / "releases" / second.id)

    code, answer = run_agent(["survey", str(root)])
    assert answer["current"] == second.id and answer["previous"] == first.id
    assert [r["content"] for r in answer["releases"]] == [first.content, second.content]
    assert [entry["release"] for entry in answer["history"]] == [first.id, second.id]


def test_staging_twice_is_a_no_op_and_a_corrupt_upload_leaves_nothing(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    release = make_release(tmp_path, "20260101000000-aaaaaaa")
    assert stage(root, release)[1]["staged"] == "unpacked"
    assert run_agent(["stage", str(root), release.id, release.sha256], b"")[1]["staged"] == "already"
    other = make_release(tmp_path, "20260101000001-bbbbbbb", "2")
    code, answer = run_agent(["stage", str(root), other.id, other.sha256], other.tarball[:-10])
    assert code == 2 and "sha256 mismatch" in answer["error"]
    assert not (root / "releases" / other.id).exists()


def test_a_tarball_escaping_the_release_is_refused(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../escaped.py")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    data = buffer.getvalue()
    code, answer = run_agent(["stage", str(root), "20260101000000-evil000", hashlib.sha256(data).hexdigest()], data)
    assert code == 2 and "unsafe entry" in answer["error"]
    assert not (tmp_path / "escaped.py").exists()
    assert not (root / "releases" / "20260101000000-evil000").exists()


def test_prune_keeps_n_and_never_the_current_or_the_one_it_replaced(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    ids = [f"2026010100000{i}-{i}{i}{i}{i}{i}{i}{i}" for i in range(5)]
    for index, release_id in enumerate(ids):
        stage(root, make_release(tmp_path, release_id, str(index)))
    switch(root, ids[0])
    code, answer = switch(root, ids[4], keep=2)
    assert code == 0 and answer["pruned"] == ids[1:4]
    assert sorted(p.name for p in (root / "releases").iterdir()) == [ids[0], ids[4]]
    code, answer = switch(root, ids[2], keep=2)
    assert code == 2 and "not on this host" in answer["error"]
    assert os.readlink(root / "current").endswith(ids[4]), "a refused switch changes nothing"


def test_prune_keeps_the_releases_a_switch_names_to_protect(tmp_path):
    """The release a rerun returns a failing host to, though the host no longer runs it."""
    root = tmp_path / "app"
    prebuilt_venv(root)
    ids = [f"2026010100000{i}-{i}{i}{i}{i}{i}{i}{i}" for i in range(4)]
    for index, release_id in enumerate(ids):
        stage(root, make_release(tmp_path, release_id, str(index)))
    switch(root, ids[0])
    switch(root, ids[1])
    command, prefix = agent.invocation("release", ["serve", str(root)])
    request = {
        "op": "switch",
        "id": ids[3],
        "keep": 2,
        "reload": "true",
        "action": "deploy",
        "deploy": "d2",
        "protect": [ids[0]],
    }
    done = subprocess.run(
        ["sh", "-c", command], input=prefix + json.dumps(request).encode() + b"\n", capture_output=True, timeout=60
    )
    answer = json.loads(done.stdout)
    assert answer["previous"] == ids[1] and answer["pruned"] == [ids[2]]
    assert sorted(p.name for p in (root / "releases").iterdir()) == [ids[0], ids[1], ids[3]]


def test_a_failing_reload_is_reported_with_the_switch_in_place(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    release = make_release(tmp_path, "20260101000000-aaaaaaa")
    stage(root, release)
    code, answer = switch(root, release.id, reload_command="echo no gunicorn here >&2; exit 3")
    assert code == 0 and answer["reload_exit"] == 3 and "no gunicorn here" in answer["reload_output"]
    assert os.readlink(root / "current").endswith(release.id)


def test_a_virtualenv_is_built_once_per_requirements(tmp_path):
    root = tmp_path / "app"
    release = make_release(tmp_path, "20260101000000-aaaaaaa", requirements=b"# nothing needed\n")
    code, answer = stage(root, release)
    assert code == 0 and answer["venv"] == "built", answer
    venv = root / "shared" / "venvs" / release.requirements
    assert (venv / "bin" / "python").exists() and (venv / ".igops-ready").exists()
    again = make_release(tmp_path, "20260101000001-bbbbbbb", "2", requirements=b"# nothing needed\n")
    assert stage(root, again)[1]["venv"] == "reused"


def test_one_session_serves_a_whole_deploy(tmp_path):
    root = tmp_path / "app"
    prebuilt_venv(root)
    release = make_release(tmp_path, "20260101000000-aaaaaaa")
    command, prefix = agent.invocation("release", ["serve", str(root)])
    with subprocess.Popen(["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as served:
        served.stdin.write(prefix)

        def ask(document, payload=b""):
            served.stdin.write(json.dumps(document).encode() + b"\n" + payload)
            served.stdin.flush()
            return json.loads(served.stdout.readline())

        assert ask({"op": "survey"})["current"] is None
        assert (
            ask(
                {"op": "stage", "id": release.id, "sha256": release.sha256, "size": release.size, "shared": []},
                release.tarball,
            )["staged"]
            == "unpacked"
        )
        assert ask({"op": "switch", "id": "nope", "keep": 5, "reload": "true", "action": "deploy", "deploy": "d1"}) == {
            "error": "release nope is not on this host"
        }
        assert (
            ask({"op": "switch", "id": release.id, "keep": 5, "reload": "true", "action": "deploy", "deploy": "d1"})[
                "reload_exit"
            ]
            == 0
        )
        assert ask({"op": "survey"})["current"] == release.id
        served.stdin.close()
        assert served.wait(10) == 0


def upstream_session(tmp_path, test_command="true"):
    upstream_file = tmp_path / "upstream.conf"
    upstream_file.write_text("upstream app {\n    server 10.0.0.1:8000;\n    server 10.0.0.2:8000;\n}\n")
    command, prefix = agent.invocation("upstream", [str(upstream_file), test_command, "true", "1"])
    return upstream_file, command, prefix


def ask_upstream(command, prefix, *requests):
    lines = b"".join(json.dumps(request).encode() + b"\n" for request in requests)
    done = subprocess.run(["sh", "-c", command], input=prefix + lines, capture_output=True, timeout=30)
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def test_the_upstream_agent_lists_servers_without_touching_nginx(tmp_path):
    upstream_file, command, prefix = upstream_session(tmp_path, test_command="exit 1")
    before = upstream_file.read_text()
    first, second = ask_upstream(command, prefix, {}, {"down": [], "up": []})
    assert first == second
    assert [(s["address"], s["down"]) for s in first["servers"]] == [("10.0.0.1:8000", False), ("10.0.0.2:8000", False)]
    assert not first["changed"] and upstream_file.read_text() == before


def test_a_failing_config_test_puts_the_old_upstream_file_back(tmp_path):
    upstream_file, command, prefix = upstream_session(tmp_path, test_command="echo bad config >&2; exit 1")
    before = upstream_file.read_text()
    [answer] = ask_upstream(command, prefix, {"down": ["10.0.0.1:8000"]})
    assert "configuration test failed" in answer["error"] and "bad config" in answer["error"]
    assert upstream_file.read_text() == before
