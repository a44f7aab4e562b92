"""One floor on both sides: the rule, and convergence of two and three sides under delay.

The sides are real :class:`SharedFloor` objects; only the network between them is
simulated (reports delivered after a per-direction delay, in order), so message
timing is exact and the tests cannot pass or fail by scheduling luck.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable

import pytest

from gateway.links.floor import Candidate, FloorChange, SharedFloor, choose, rank
from gateway.links.talker import Talker


class Mesh:
    """Sides that send each change of their report to every peer after a delay (ms)."""

    def __init__(self, sites: list[str], delay: Callable[[str, str], int]) -> None:
        self.floors = {site: SharedFloor(site) for site in sites}
        self.delay = delay
        self.now = 0
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.changes: dict[str, list[tuple[int, FloorChange]]] = {s: [] for s in sites}
        self.last_local_event = 0

    def at(self, when: int, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), action))

    def key_up(self, when: int, site: str, talker: int, **rank_fields: object) -> None:
        self.at(when, lambda: self._local(site, lambda f: f.key_up(talker, when, **rank_fields)))

    def let_go(self, when: int, site: str, talker: int) -> None:
        self.at(when, lambda: self._local(site, lambda f: f.let_go(talker)))

    def _local(self, site: str, change: Callable[[SharedFloor], FloorChange | None]) -> None:
        self.last_local_event = self.now
        floor = self.floors[site]
        before = floor.report()
        self._record(site, change(floor))
        report = floor.report()
        if report != before:
            for peer in self.floors:
                if peer != site:
                    self.at(self.now + self.delay(site, peer), self._deliver(site, peer, report))

    def _deliver(self, site: str, peer: str, report: Candidate | None) -> Callable[[], None]:
        return lambda: self._record(peer, self.floors[peer].heard(site, report))

    def _record(self, site: str, change: FloorChange | None) -> None:
        if change is not None:
            self.changes[site].append((self.now, change))

    def run(self) -> None:
        while self._queue:
            self.now, _, action = heapq.heappop(self._queue)
            action()

    def holders(self) -> set[tuple[str, int] | None]:
        return {
            (f.holder.site, f.holder.talker) if f.holder else None for f in self.floors.values()
        }

    def converged_at(self) -> int:
        return max((changes[-1][0] for changes in self.changes.values() if changes), default=0)


def one_way(table: dict[tuple[str, str], int]) -> Callable[[str, str], int]:
    return lambda a, b: table[(a, b)]


def test_the_rule_emergency_then_priority_then_earliest_then_site() -> None:
    early = Candidate("us", 1, keyed_at_ms=1000)
    late = Candidate("ca", 1, keyed_at_ms=1005)
    assert choose([late, early]) == early
    assert choose([early, Candidate("ca", 2, 1000)]).site == "ca"  # same ms: lower site ID
    assert choose([early, Candidate("us", 0, 1000)]).talker == 0  # same site: lower talker
    high = Candidate("ca", 3, keyed_at_ms=2000, priority=5)
    assert choose([early, late, high]) == high
    sos = Candidate("mx", 4, keyed_at_ms=3000, priority=0, emergency=True)
    assert choose([early, high, sos]) == sos
    assert choose([]) is None
    assert sorted([sos, high, late, early], key=rank) == [sos, high, early, late]


@pytest.mark.parametrize(("ca_to_us", "us_to_ca"), [(0, 0), (5, 40), (40, 5), (1, 150), (75, 75)])
def test_simultaneous_key_up_on_two_sides_converges_within_one_round_trip(
    ca_to_us: int, us_to_ca: int
) -> None:
    mesh = Mesh(["ca", "us"], one_way({("ca", "us"): ca_to_us, ("us", "ca"): us_to_ca}))
    mesh.key_up(1000, "ca", 1)
    mesh.key_up(1000, "us", 1)
    mesh.run()
    assert mesh.holders() == {("ca", 1)}  # same millisecond: the lower site ID
    assert mesh.converged_at() <= 1000 + max(ca_to_us, us_to_ca)
    us_changes = [c.kind for _, c in mesh.changes["us"]]
    assert us_changes == ["granted", "resolved"]  # US granted its own, then gave way
    assert [c.kind for _, c in mesh.changes["ca"]] == ["granted"]
    assert mesh.floors["us"].may_talk(1) is False and mesh.floors["ca"].may_talk(1)


@pytest.mark.parametrize("gap", [1, 10, 30, 60])
def test_the_earlier_key_up_wins_even_when_heard_after_the_later_one(gap: int) -> None:
    """US keys first but its report reaches Canada 80 ms later; Canada keys in between."""
    mesh = Mesh(["ca", "us"], one_way({("ca", "us"): 10, ("us", "ca"): 80}))
    mesh.key_up(500, "us", 7)
    mesh.key_up(500 + gap, "ca", 3)
    mesh.run()
    assert mesh.holders() == {("us", 7)}
    assert mesh.converged_at() <= 500 + gap + 80


def test_three_sides_converge_whatever_the_delays_and_order() -> None:
    rng = random.Random(15)
    sites = ["ca", "mx", "us"]
    for _ in range(300):
        delays = {(a, b): rng.randint(0, 120) for a in sites for b in sites if a != b}
        mesh = Mesh(sites, one_way(delays))
        expected = []
        for site in sites:
            for talker in range(rng.randint(0, 2)):
                when = 1000 + rng.randint(0, 40)
                priority = rng.choice([0, 0, 0, 3])
                mesh.key_up(when, site, talker, priority=priority)
                expected.append(Candidate(site, talker, when, priority))
        mesh.run()
        best = choose(expected)
        assert mesh.holders() == {(best.site, best.talker) if best else None}, delays
        assert mesh.converged_at() <= mesh.last_local_event + max(delays.values())


def test_an_emergency_pre_empts_across_the_border() -> None:
    mesh = Mesh(["ca", "us"], one_way({("ca", "us"): 20, ("us", "ca"): 30}))
    mesh.key_up(0, "us", 1, priority=3)
    mesh.key_up(500, "ca", 2, emergency=True)
    mesh.run()
    assert mesh.holders() == {("ca", 2)}
    (when, change), *_ = [(t, c) for t, c in mesh.changes["us"] if c.kind == "preempted"]
    assert when == 520 and change.old.site == "us" and change.new.site == "ca"
    assert [c.kind for _, c in mesh.changes["ca"]] == ["granted", "preempted"]
    # The emergency lets go: the US talker, still keyed, gets the floor back on both sides.
    mesh.let_go(900, "ca", 2)
    mesh.run()
    assert mesh.holders() == {("us", 1)}
    assert mesh.changes["ca"][-1][1].kind == "granted"


def test_a_peers_talker_dropping_out_frees_the_floor() -> None:
    mesh = Mesh(["ca", "us"], one_way({("ca", "us"): 25, ("us", "ca"): 25}))
    mesh.key_up(0, "us", 4)
    mesh.key_up(100, "ca", 9)  # keyed later: hears the busy tone
    mesh.run()
    assert mesh.holders() == {("us", 4)} and not mesh.floors["ca"].may_talk(9)
    mesh.let_go(1000, "us", 4)
    mesh.run()
    assert mesh.holders() == {("ca", 9)}
    assert mesh.floors["ca"].may_talk(9)
    assert mesh.changes["ca"][-1] == (
        1025,
        FloorChange("granted", Candidate("us", 4, 0), Candidate("ca", 9, 100)),
    )
    mesh.let_go(2000, "ca", 9)
    mesh.run()
    assert mesh.holders() == {None}
    assert mesh.changes["us"][-1][1].kind == "released"


def test_a_link_that_drops_unkeys_the_peers_talker_at_once() -> None:
    floor = SharedFloor("ca")
    floor.key_up(talker=1, keyed_at_ms=200)
    assert floor.heard("us", Candidate("us", 5, keyed_at_ms=100)).kind == "resolved"
    assert not floor.holder_is_local
    change = floor.heard("us", None)  # link down, or the US cut it
    assert change == FloorChange("granted", Candidate("us", 5, 100), Candidate("ca", 1, 200))
    assert floor.may_talk(1)


def test_a_peer_speaks_only_for_itself() -> None:
    floor = SharedFloor("ca")
    floor.heard("us", Candidate("mx", 1, keyed_at_ms=0, emergency=True))
    assert floor.holder == Candidate("us", 1, 0, emergency=True)
    assert floor.report() is None  # nothing of ours to report
    with pytest.raises(ValueError, match="site IDs must differ"):
        floor.heard("ca", None)


def test_the_holder_raising_its_priority_is_no_change() -> None:
    floor = SharedFloor("ca")
    assert floor.key_up(1, 0).kind == "granted"
    assert floor.key_up(1, 0, priority=7, emergency=True) is None
    assert floor.holder == Candidate("ca", 1, 0, 7, True)


def test_a_candidate_from_a_received_talker() -> None:
    now = (3 << 32) + 500
    talker = Talker(keyed=True, talker_id=9, keyed_at=(now - 40) & 0xFFFFFFFF, priority=2)
    assert Candidate.from_talker("us", talker, now) == Candidate("us", 9, now - 40, 2)
    assert Candidate.from_talker("us", Talker(keyed=False, talker_id=9), now) is None
