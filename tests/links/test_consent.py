"""Mutual consent: audio crosses only where both offers meet; nothing else is revealed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.links.consent import (
    DIRECTIONS,
    MAX_NAMES,
    Flow,
    Offer,
    Refused,
    Shares,
    from_sdp,
    meet,
    to_sdp,
)

# Canada shares its 'shiprider' talkgroup as 'marine' both ways, and its 'harbour'
# talkgroup as 'port-ops' (send only); 'dispatch' exists but is not shared.
CANADA = Shares({"marine": ("shiprider", "both"), "port-ops": ("harbour", "send")})


@pytest.mark.parametrize(
    ("mine", "theirs", "flows"),
    [
        ("both", "both", (True, True)),
        ("both", "send", (False, True)),
        ("both", "receive", (True, False)),
        ("send", "both", (True, False)),
        ("send", "receive", (True, False)),
        ("send", "send", (False, False)),
        ("receive", "both", (False, True)),
        ("receive", "send", (False, True)),
        ("receive", "receive", (False, False)),
    ],
)
def test_directions_meet(mine: str, theirs: str, flows: tuple[bool, bool]) -> None:
    assert meet(mine, theirs) == flows  # type: ignore[arg-type]


def test_a_name_crosses_only_while_both_share_it() -> None:
    us = Offer({"marine": "both", "port-ops": "send", "border-ops": "both"})
    consent = CANADA.agree(us)
    assert set(consent.flows) == {"marine"}  # port-ops: send meets send
    assert consent.flows["marine"] == Flow("marine", "shiprider", send=True, receive=True)
    assert consent.unmet == {"port-ops"}
    assert "border-ops" not in consent.answer().names  # theirs alone: never echoed
    assert consent.answer() == Offer({"marine": "both"})
    assert consent.for_talkgroup("shiprider") == [consent.flows["marine"]]
    # The US withdraws marine: nothing crosses any more, whatever Canada shares.
    assert CANADA.agree(Offer({"port-ops": "receive"})).flows.keys() == {"port-ops"}
    assert not CANADA.agree(Offer()).flows


def test_a_cut_withdraws_the_name_at_once() -> None:
    cut = CANADA.without(["marine"])
    assert cut.names == {"port-ops"} and CANADA.names == {"marine", "port-ops"}
    assert "marine" not in cut.agree(Offer({"marine": "both"})).flows
    assert cut.answer("marine", "both") == Refused("not_shared")


def test_one_dialog_is_answered_with_the_agreed_sdp_direction() -> None:
    flow = CANADA.answer("marine", from_sdp("sendonly"))
    assert isinstance(flow, Flow)
    assert (flow.send, flow.receive, flow.sdp) == (False, True, "recvonly")
    assert CANADA.answer("port-ops", from_sdp("sendonly")) == Refused("bad_direction")
    assert CANADA.answer("port-ops", from_sdp("inactive")) == Refused("bad_direction")
    assert CANADA.answer("port-ops", "receive").sdp == "sendonly"  # type: ignore[union-attr]


def test_names_we_do_not_share_are_refused_alike() -> None:
    """A local talkgroup's own name gets the same answer as a name that exists nowhere."""
    for probe in ("shiprider", "dispatch", "no-such-name", "", "MARINE", None, 42):
        assert CANADA.answer(probe, "both") == Refused("not_shared")  # type: ignore[arg-type]


def test_sdp_attributes_map_to_directions_both_ways() -> None:
    for direction in DIRECTIONS:
        assert from_sdp(to_sdp(direction)) == direction
    assert from_sdp(" SendRecv ") == "both"
    assert from_sdp("inactive") is None and from_sdp("x") is None


def test_our_offer_holds_shared_names_and_directions_only() -> None:
    text = CANADA.offer().encode()
    assert text == "marine=both,port-ops=send"
    assert "shiprider" not in text and "harbour" not in text
    assert Offer.decode(text) == (CANADA.offer(), [])


def test_a_bad_peer_offer_is_dropped_entry_by_entry_and_counted() -> None:
    offer, reasons = Offer.decode(
        "marine=both, port-ops = send ,Bad Name=both,x=sideways,noequals,twice=both,twice=send,,"
    )
    assert offer.names == {"marine": "both", "port-ops": "send"}
    assert sorted(reasons) == ["bad_direction", "bad_name", "duplicate", "malformed"]
    offer, reasons = Offer.decode(",".join(f"n{i}=both" for i in range(MAX_NAMES + 5)))
    assert len(offer.names) == MAX_NAMES and reasons == ["too_many"]
    assert Offer.decode("a=both" * 10_000) == (Offer(), ["malformed"])
    assert Offer.decode(None) == (Offer(), ["malformed"])  # type: ignore[arg-type]


def test_shares_refuse_names_that_could_not_go_on_the_wire() -> None:
    with pytest.raises(ValueError, match="shared name"):
        Shares({"Marine Ops": ("shiprider", "both")})
    with pytest.raises(ValueError, match="both, send, receive"):
        Shares({"marine": ("shiprider", "sideways")})  # type: ignore[dict-item]


names = st.from_regex(r"[a-z0-9][a-z0-9_.-]{0,8}", fullmatch=True)
directions = st.sampled_from(DIRECTIONS)


@settings(max_examples=200, deadline=None)
@given(
    mine=st.dictionaries(names, st.tuples(names, directions), max_size=8),
    theirs=st.dictionaries(names, directions, max_size=8),
)
def test_property_nothing_we_send_names_what_we_do_not_share(
    mine: dict[str, tuple[str, str]], theirs: dict[str, str]
) -> None:
    shares = Shares(mine)  # type: ignore[arg-type]
    consent = shares.agree(Offer(theirs))  # type: ignore[arg-type]
    for sent in (shares.offer(), consent.answer()):
        assert set(sent.names) <= set(mine)
        decoded, reasons = Offer.decode(sent.encode())
        assert decoded == sent and not reasons
    assert set(consent.flows) <= set(mine) & set(theirs)
    assert consent.unmet <= set(mine) & set(theirs)
    for name, flow in consent.flows.items():
        send, receive = meet(mine[name][1], theirs[name])  # type: ignore[arg-type]
        assert (flow.send, flow.receive) == (send, receive) and (send or receive)
        answered = shares.answer(name, theirs[name])  # type: ignore[arg-type]
        assert answered == flow  # one dialog agrees with the whole-list exchange
    for name in set(theirs) - set(mine):
        assert shares.answer(name, theirs[name]) == Refused("not_shared")  # type: ignore


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_property_decoding_any_text_never_raises(text: str) -> None:
    offer, reasons = Offer.decode(text)
    assert all(isinstance(r, str) for r in reasons)
    assert Offer.decode(offer.encode()) == (offer, [])
