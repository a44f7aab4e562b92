"""A card's process is small: no NumPy, and only what its callback touches locked in memory.

A site box runs one per radio. Read from the process's own ``/proc/PID/smaps`` while
its stream runs on the test's JACK server. The JACK server's shared segment is left
out of the figures: libjack maps it into every client and locks it (about 100 MB at
the server's default ``--port-max``), and the box holds it once whoever maps it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gateway.hardware.card_process import CardBlock, CardProcess, OpenRequest

from tests.hardware.jackradio import LEAST_WAIT_S
from tests.waiting import wait_for

pytestmark = pytest.mark.jack
MB = 1024 * 1024


def mappings(pid: int) -> list[dict]:
    """Each mapping of ``pid``: its file, size, resident bytes and whether it is locked."""
    found: list[dict] = []
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if not first[0].endswith(":"):
            found.append({"path": first[5] if len(first) > 5 else "", "flags": []})
        elif first[0] in ("Size:", "Rss:"):
            found[-1][first[0][:-1].lower()] = int(first[1]) * 1024
        elif first[0] == "VmFlags:":
            found[-1]["flags"] = line.split()[1:]
    return [m for m in found if not m["path"].startswith("/dev/shm/jack")]


@pytest.fixture
def card(jack_server):
    block = CardBlock()
    process = CardProcess(block)
    request = OpenRequest("system", "JACK", 1, 1, 0, 0, None, 0, "low", "footprint-test")
    try:
        process.start(request)
        assert process.process is not None
        yield block, process.process.pid
    finally:
        process.stop()
        block.close()


def test_the_card_process_carries_no_numpy_and_stays_within_30_mb(card):
    block, pid = card
    maps = mappings(pid)
    loaded = " ".join(m["path"] for m in maps)
    assert "libportaudio" in loaded, "the stream is not open in this process"
    assert "numpy" not in loaded and "openblas" not in loaded
    resident = sum(m["rss"] for m in maps)
    assert resident <= 30 * MB, f"{resident / MB:.1f} MB resident besides the JACK segment"


def test_the_card_process_locks_its_rings_and_callback_code_and_little_else(card):
    block, pid = card

    def locked() -> list[dict]:
        return [m for m in mappings(pid) if "lo" in m["flags"]]

    # the block is locked before the stream's first callbacks; the code once it has run
    wait_for(
        lambda: any("_callback" in m["path"] for m in locked()), LEAST_WAIT_S, "the code locked"
    )
    paths = [m["path"] for m in locked()]
    assert f"/dev/shm/{block.name}" in paths, "the rings are not locked"
    assert any("libportaudio" in p for p in paths), "PortAudio's code is not locked"
    size = sum(m["size"] for m in locked())
    assert size <= 10 * MB, f"{size / MB:.1f} MB locked besides the JACK segment"
