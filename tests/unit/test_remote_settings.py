"""SSH settings from the inventory: what a command (a dry run too) needs before it can reach a host."""

import pytest

from igops import inventory, remote
from igops.errors import UsageError
from tests.unit.inventories import unit_inventory


def test_every_missing_ssh_credential_is_reported_at_once(tmp_path):
    path = unit_inventory(tmp_path, [("db1", "127.0.99.1", "app")], ssh=f'identity_file = "{tmp_path / "no-key"}"\n')
    (tmp_path / "known_hosts").unlink()
    with pytest.raises(UsageError) as caught:
        remote.settings_for(inventory.load_file(path))
    assert "known_hosts file" in caught.value.message and "identity file" in caught.value.message
    assert "[ssh] known_hosts" in caught.value.hint and "[ssh] identity_file" in caught.value.hint
