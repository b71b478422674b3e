"""Small inventories for tests that run the real CLI without a fleet: hosts on addresses where
nothing answers, an empty known_hosts, short timeouts."""

from pathlib import Path


def unit_inventory(tmp_path: Path, hosts: list[tuple[str, str, str]], ssh: str = "", sections: str = "") -> Path:
    """`hosts`: (name, address, role) each; `ssh`: more [ssh] lines; `sections`: more TOML."""
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("")
    path = tmp_path / "igops.toml"
    host_tables = "".join(
        f'[[hosts]]\nname = "{name}"\naddress = "{address}"\nroles = ["{role}"]\n' for name, address, role in hosts
    )
    path.write_text(
        f'[fleet]\nname = "unit"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[ssh]\nknown_hosts = "{known_hosts}"\nconnect_timeout = 1\n{ssh}'
        f"{sections}{host_tables}"
    )
    return path
