"""The relay's loop-free rule, and the topology INFO body read as hostile input."""

from __future__ import annotations

import pytest

from gateway.links.talker import Rejected
from gateway.links.topology import CONTENT_TYPE, Topology, body, held_back, read


def test_a_body_reads_back_as_it_was_said() -> None:
    said = Topology(relay=True, onward=False, links=frozenset({"ca-bc", "us-wa"}))
    assert read(CONTENT_TYPE, body(said).encode()) == said
    assert read(CONTENT_TYPE + "; charset=utf-8", b"relay=0\r\n") == Topology()


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no relay field
        b"relay=2\r\n",
        b"relay=1\r\nrelay=1\r\n",
        b"relay=1\r\nlabel=x\r\n",  # not ours
        b"relay=1\r\nonward=yes\r\n",
        b"relay=1\r\nlinks=a b\r\n",
        b"relay=1\r\nlinks=" + b",".join(b"s%d" % i for i in range(17)) + b"\r\n",
        b"relay=1\r\nlinks=" + b"x" * 600 + b"\r\n",
        b"relay",
    ],
)
def test_anything_else_is_refused_not_raised(data: bytes) -> None:
    assert isinstance(read(CONTENT_TYPE, data), Rejected)


def test_a_label_body_is_not_a_topology() -> None:
    assert isinstance(read("application/borderlink-talker", b"relay=1\r\n"), Rejected)


def test_the_rule() -> None:
    plain = Topology()
    assert held_back({"a": plain, "c": plain}) == ""  # a chain: relay
    assert held_back({"a": plain}) == ""  # one link: nothing to forward
    assert "has not said" in held_back({"a": plain, "c": None})
    assert "relays too" in held_back({"a": Topology(relay=True), "c": plain})
    assert "refuses" in held_back({"a": Topology(onward=False), "c": plain})
    direct = Topology(links=frozenset({"c"}))
    assert held_back({"a": direct, "c": plain}) == "a links to c directly"  # a triangle
    assert held_back({"a": Topology(links=frozenset({"d"})), "c": plain}) == ""  # D beyond A


def test_a_relayed_label_names_its_origin_site() -> None:
    from gateway.links import labels

    named = labels.Named(7, 1234, "RCMP · Marine 7", "ca-bc")
    assert labels.read(labels.CONTENT_TYPE, labels.body(named).encode()) == named
    own = labels.Named(7, 1234, "RCMP · Marine 7")
    assert "site=" not in labels.body(own)
    assert labels.read(labels.CONTENT_TYPE, labels.body(own).encode()) == own
    bad = labels.body(own) + "site=a b\r\n"
    assert isinstance(labels.read(labels.CONTENT_TYPE, bad.encode()), Rejected)
