"""The lab's fixed facts that a person may change: the size of its volumes."""

import pytest

from igops.errors import UsageError
from igops.lab.state import IMAGE_SIZE, volume_size


def test_the_lab_volume_size_grows_by_the_environment_never_below_the_default():
    assert volume_size({}) == IMAGE_SIZE
    assert volume_size({"IGOPS_LAB_VOLUME_SIZE": "3G"}) == 3 << 30
    assert volume_size({"IGOPS_LAB_VOLUME_SIZE": "2048m"}) == 2 << 30
    assert volume_size({"IGOPS_LAB_VOLUME_SIZE": "1M"}) == IMAGE_SIZE
    with pytest.raises(UsageError, match="is not a size"):
        volume_size({"IGOPS_LAB_VOLUME_SIZE": "big"})
