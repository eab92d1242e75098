"""keep_message_buffers: the model server's malloc tuning for message-sized buffers."""

from __future__ import annotations

import platform
import sys

import pytest

from meshserve.servers.server import keep_message_buffers


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibc_takes_the_thresholds_and_a_second_call_is_harmless() -> None:
    assert keep_message_buffers(8 * 1024 * 1024)
    assert keep_message_buffers(64 * 1024 * 1024)  # capped at glibc's 32 MiB maximum
