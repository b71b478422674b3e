"""The freeze window with 1, 2, 4 and 8 volumes on one host: igops against the sequential
per-volume method of ec2-consistent-snapshot (freeze, CreateSnapshot one volume after another,
thaw), both against moto behind a proxy that adds the same latency to every API call, as a real
region does. Goals: igops' window stays flat as volumes grow and is at least 4x shorter at 8, and
it is at most 1.3x one API round trip: the same CreateSnapshots call timed alone through the proxy
(the injected latency plus moto's own time), so freeze, call and thaw add little on top of it.

Self-contained: its own XFS volumes on loop devices, sshd, moto and proxy on 127.0.30.20x.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from igops.lab import sshd  # noqa: E402
from igops.lab.faults import AwsProxy, Faults  # noqa: E402

HOST_ADDRESS = "127.0.30.200"
MOTO = ("127.0.30.201", 5001)
PROXY = ("127.0.30.201", 5002)
LATENCY = 0.100
SIZES = [1, 2, 4, 8]
REPEATS = 3
SSH_PORT = 2201
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def make_volumes(work: Path, count: int) -> list[tuple[str, Path]]:
    volumes = []
    for index in range(count):
        image, mount = work / f"vol{index}.img", work / f"m{index}"
        with open(image, "wb") as handle:
            handle.truncate(320 << 20)
        device = subprocess.run(
            ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
        ).stdout.strip()
        subprocess.run(["mkfs.xfs", "-q", "-f", device], check=True)
        mount.mkdir()
        subprocess.run(["mount", device, str(mount)], check=True)
        (mount / "data").write_bytes(os.urandom(1 << 20))
        volumes.append((device, mount))
    return volumes


def remove_volumes(volumes: list[tuple[str, Path]]) -> None:
    for device, mount in volumes:
        subprocess.run(["fsfreeze", "-u", str(mount)], capture_output=True)
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def sequential(ec2, volumes: list[tuple[str, str, Path]]) -> float:
    """ec2-consistent-snapshot's method: freeze all, one CreateSnapshot after another, thaw all."""
    started = time.perf_counter()
    for _, _, mount in volumes:
        subprocess.run(["fsfreeze", "-f", str(mount)], check=True)
    try:
        for volume_id, _, _ in volumes:
            ec2.create_snapshot(VolumeId=volume_id, Description="sequential baseline")
    finally:
        for _, _, mount in reversed(volumes):
            subprocess.run(["fsfreeze", "-u", str(mount)], check=True)
    return (time.perf_counter() - started) * 1000


def api_round_trip(ec2, instance: str) -> float:
    """The call igops makes inside the window, alone: CreateSnapshots of the instance's data volumes."""
    started = time.perf_counter()
    ec2.create_snapshots(
        InstanceSpecification={"InstanceId": instance, "ExcludeBootVolume": True},
        Description="API round trip alone",
        TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": "bench", "Value": "rtt"}]}],
    )
    return (time.perf_counter() - started) * 1000


def main() -> None:
    import boto3

    work = Path(tempfile.mkdtemp(prefix="igops-bench-snap-"))
    os.environ.update(AWS_ENV)
    moto = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", MOTO[0], "-p", str(MOTO[1])],
        env={**os.environ, "MOTO_EC2_LOAD_DEFAULT_AMIS": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = AwsProxy(PROXY, f"http://{MOTO[0]}:{MOTO[1]}", Faults(latency=LATENCY)).__enter__()
    keys = sshd.ensure_keys(work / "ssh")
    sshd.write_known_hosts(keys, [(HOST_ADDRESS, SSH_PORT)])
    sshd.start(work / "ssh", "snapbench", keys, [HOST_ADDRESS], SSH_PORT)
    volumes = make_volumes(work, max(SIZES))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://{MOTO[0]}:{MOTO[1]}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        direct = boto3.client("ec2", endpoint_url=f"http://{MOTO[0]}:{MOTO[1]}")
        slow = boto3.client("ec2", endpoint_url=f"http://{PROXY[0]}:{PROXY[1]}")
        instances = {}
        attached = {}
        for size in SIZES:
            # One instance per size, whose data volumes are exactly the mounts snapshotted, so igops
            # may use its single CreateSnapshots call.
            instance = direct.run_instances(
                ImageId="ami-0abcdef1234567890", MinCount=1, MaxCount=1, InstanceType="t3.small"
            )["Instances"][0]["InstanceId"]
            instances[size] = instance
            attached[size] = []
            for device, mount in volumes[:size]:
                volume_id = direct.create_volume(Size=1, AvailabilityZone="us-east-1a")["VolumeId"]
                direct.attach_volume(VolumeId=volume_id, InstanceId=instance, Device=device)
                attached[size].append((volume_id, device, mount))
        print(
            f"snapshot_freeze: freeze window (ms), median of {REPEATS}, {LATENCY * 1000:.0f} ms injected per API call"
        )
        print(f"{'volumes':>7} {'igops':>8} {'API call':>9} {'igops/call':>11} {'sequential':>11} {'ratio':>7}")
        worst_over_call = 0.0
        for size in SIZES:
            inventory = work / f"inventory-{size}.toml"
            mounts = "".join(f'[[hosts.mounts]]\npath = "{mount}"\n' for _, _, mount in attached[size])
            inventory.write_text(f"""[fleet]
state_dir = "{work / "state"}"
[ssh]
port = {SSH_PORT}
known_hosts = "{keys.known_hosts}"
identity_file = "{keys.client_key}"
[aws]
endpoint_url = "http://{PROXY[0]}:{PROXY[1]}"
[[hosts]]
name = "bench{size}"
address = "{HOST_ADDRESS}"
roles = ["memcached"]
instance_id = "{instances[size]}"
{mounts}""")
            ours, theirs, calls = [], [], []
            for _ in range(REPEATS):
                done = subprocess.run(
                    [
                        str(Path(sys.executable).with_name("igops")),
                        "-c",
                        str(inventory),
                        "snapshot",
                        "create",
                        f"bench{size}",
                        "--yes",
                        "--json",
                    ],
                    capture_output=True,
                    text=True,
                )
                envelope = json.loads(done.stdout)
                if not envelope["ok"]:
                    raise SystemExit(f"igops failed: {envelope['error']}")
                ours.append(envelope["data"]["freeze_window_ms"])
                theirs.append(sequential(slow, attached[size]))
                calls.append(api_round_trip(slow, instances[size]))
            mine, baseline, call = statistics.median(ours), statistics.median(theirs), statistics.median(calls)
            worst_over_call = max(worst_over_call, mine / call)
            print(
                f"{size:>7} {mine:>8.0f} {call:>9.0f} {mine / call:>10.2f}x {baseline:>11.0f} {baseline / mine:>6.1f}x"
            )
        print(
            f"goal: the window at most 1.3x one API call: {'met' if worst_over_call <= 1.3 else 'missed'} "
            f"(at most {worst_over_call:.2f}x)"
        )
    finally:
        remove_volumes(volumes)
        sshd.stop(work / "ssh", "snapbench")
        proxy.__exit__(None, None, None)
        moto.terminate()
        moto.wait()


if __name__ == "__main__":
    main()
