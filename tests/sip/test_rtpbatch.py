"""The leg bank's C loops (gateway/sip/_rtpbatch.c) against the NumPy they replaced.

The NumPy code that demultiplexed, compared talker blocks and classified a received
batch, and put packets into the jitter buffers and played them out, until #15 (10 ms
frames) is kept here, verbatim but for names, as the oracle. The jitter bank is fed
jitter, loss, duplicates, reordering and restarts, and must give the same frames and
state each tick; the send batch's packets must be the same bytes the NumPy headers and
extension attachment made. For the receive batch, hypothesis builds hostile batches
(garbage, short and truncated datagrams, RTCP, strangers' addresses and SSRCs, header
extensions whose length runs into the payload or past the end, stale bytes after every
packet in the receive buffer) against a real LegTable, and each C loop must give what
the NumPy gave — the same leg, the same drop class, the same header fields, the same
blocks handed over and taken out.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import as_strided

from gateway.sip import _rtpbatch
from gateway.sip.bank_ext import MAX_EXTENSION, ExtensionEdges
from gateway.sip.bank_rx import (
    DECODE,
    FAST,
    HUGE,
    MAX_PACKET,
    MAX_PAYLOAD,
    REST,
    SHORT,
    VERSION,
)
from gateway.sip.bank_tx import SendPath
from gateway.sip.jitter import (
    CREEP_TALKING,
    FORWARD_HYSTERESIS,
    HISTORY,
    LATE_RESYNC,
    MARGIN,
    PLC_FADE,
    RING,
    TAIL,
    TARGET_RANK,
    WHOLE_CREEP_EVERY,
    JitterBank,
    dense,
)
from gateway.sip.legmedia import LegMedia
from gateway.sip.legtable import ADDRESS_ONLY, ANY_SSRC, EXACT, UNKNOWN, LegTable
from gateway.sip.rtp import build_header
from gateway.sip.srtp import (
    AUTH_FAIL,
    REPLAY_FAIL,
    TAG,
    LegSrtp,
    _address,
    new_crypto,
    protect_rows,
    unprotect_rows,
)
from gateway.sip.streams import NO_SSRC

WIDTH = 2048  # the receive buffer's slot (mmsg.BatchReceiver)
ADDRESSES = [(0x7F000001 << 16) | port for port in (4000, 4002, 4004)]
STRANGER = (0x7F000002 << 16) | 4000
SSRCS = [0x11111111, 0x22222222, 0xDEADBEEF, 0]
PAYLOAD_TYPES = [0, 8, 96, 111]

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


# --- the NumPy this replaced (the oracle) ----------------------------------------------


def old_lookup(t: LegTable, keys: np.ndarray, ssrcs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = len(keys)
    rows = np.full(n, -1, np.int64)
    match = np.full(n, UNKNOWN, np.int64)
    if not t._addresses.size:
        return rows, match
    rank = np.searchsorted(t._addresses, keys)
    inside = rank < t._addresses.size
    known = inside.copy()
    known[inside] = t._addresses[rank[inside]] == keys[inside]
    if not known.any():
        return rows, match
    match[known] = ADDRESS_ONLY
    rows[known] = t._sole[rank[known]]
    base = rank << 33
    for kind, wanted in ((ANY_SSRC, base), (EXACT, base | (ssrcs + 1))):
        at = np.searchsorted(t._keys, wanted[known])
        at_ok = at < t._keys.size
        hit = np.zeros(len(at), bool)
        hit[at_ok] = t._keys[at[at_ok]] == wanted[known][at_ok]
        where = np.flatnonzero(known)[hit]
        rows[where] = t._key_rows[at[hit]]
        match[where] = kind
    return rows, match


def old_take(t, data, length, head, rows, match, heard: list) -> None:  # noqa: ANN001
    candidate = (head[:, 0] == 0x90) & (match == EXACT)
    if not candidate.any():
        return
    candidate[candidate] = t.ext_in[rows[candidate]]
    idx = np.flatnonzero(candidate)
    if idx.size == 0:
        return
    words = (data[idx, 12 + 2].astype(np.int64) << 8) | data[idx, 12 + 3]
    size = 4 + 4 * words
    fits = 12 + size < length[idx]
    idx, size = idx[fits], size[fits]
    if idx.size == 0:
        return
    news = old_news(t, data, idx, size, rows[idx])
    for i, s in zip(idx[news].tolist(), size[news].tolist(), strict=True):
        heard.append((int(rows[i]), bytes(data[i, 12 : 12 + s])))
    for s in np.unique(size).tolist():
        pick = idx[size == s]
        end = int(length[pick].max())
        data[pick, 12 : end - s] = data[pick, 12 + s : end]
        length[pick] -= s
        head[pick, 0] = 0x80


def old_news(t, data, idx, size, rows) -> np.ndarray:  # noqa: ANN001
    order = np.argsort(rows, kind="stable")
    legs, sizes = rows[order], size[order]
    blocks = data[idx[order], 12 : 12 + MAX_EXTENSION].copy()
    blocks[np.arange(MAX_EXTENSION) >= sizes[:, None]] = 0
    first = np.r_[True, legs[1:] != legs[:-1]]
    before = np.where(first[:, None], t.ext_heard[legs], np.roll(blocks, 1, axis=0))
    before_size = np.where(first, t.ext_heard_len[legs], np.roll(sizes, 1))
    same = (sizes == before_size) & (sizes <= MAX_EXTENSION) & (blocks == before).all(1)
    last = np.r_[legs[1:] != legs[:-1], True]
    t.ext_heard[legs[last]] = blocks[last]
    t.ext_heard_len[legs[last]] = np.where(sizes[last] <= MAX_EXTENSION, sizes[last], 0)
    news = np.empty(len(rows), bool)
    news[order] = ~same
    return news


def old_batch(t: LegTable, data, length, truncated, source):  # noqa: ANN001, ANN201
    """The old _batch's demultiplexing and classification (no SRTP leg): what it found."""
    head = np.ascontiguousarray(data[:, :12])
    b1 = head[:, 1]
    rtcp = (b1 >= 192) & (b1 <= 223)
    h = np.where(rtcp[:, None], head[:, 4:8], head[:, 8:12]).astype(np.int64)
    ssrc = (h[:, 0] << 24) | (h[:, 1] << 16) | (h[:, 2] << 8) | h[:, 3]
    rows, match = old_lookup(t, source, ssrc)
    b0 = head[:, 0]
    huge = truncated | (length > MAX_PACKET)
    short = (length < 12) & ~huge
    wrong_version = ((b0 >> 6) != 2) & ~huge & ~short
    good = ~(huge | short | wrong_version)
    heard: list = []
    if t.ext_in[rows[rows >= 0]].any():
        old_take(t, data, length, head, rows, match, heard)
    pt = (b1 & 0x7F).astype(np.int64)
    fast = (
        good
        & (match == EXACT)
        & (b0 == 0x80)
        & (length > 12)
        & (length <= 12 + MAX_PAYLOAD)
        & (pt == t.payload_type[rows])
    )
    kind = np.select([huge, short, wrong_version, fast], [HUGE, SHORT, VERSION, FAST], REST)
    header = head.astype(np.int64)
    fields = (
        (header[:, 2] << 8) | header[:, 3],
        (header[:, 4] << 24) | (header[:, 5] << 16) | (header[:, 6] << 8) | header[:, 7],
        (header[:, 8] << 24) | (header[:, 9] << 16) | (header[:, 10] << 8) | header[:, 11],
        (header[:, 1] & 0x80) != 0,
    )
    f = np.flatnonzero(fast)
    order = np.argsort(rows[f], kind="stable")
    sorted_rows = rows[f][order]
    rank = np.zeros(len(rows), np.int64)
    if f.size:
        first = np.flatnonzero(np.r_[True, sorted_rows[1:] != sorted_rows[:-1]])
        r = np.empty(f.size, np.int64)
        r[order] = np.arange(f.size) - np.repeat(first, np.diff(np.r_[first, f.size]))
        rank[f] = r
    return rows, match, heard, kind, fields, rank


# --- the code under test ----------------------------------------------------------------


def new_batch(t: LegTable, data, length, truncated, source):  # noqa: ANN001, ANN201
    heard: list = []
    for row in t.active.tolist():
        t.media[row].on_extension = lambda block, row=row: heard.append((row, block))
    rows, match = t.lookup(source, data)
    ext_size = ExtensionEdges(t).news(data, length, rows, match)
    n = len(length)
    kind, seq, ts, ssrc, rank = (np.empty(n, np.int64) for _ in range(5))
    marker = np.empty(n, bool)
    rounds = _rtpbatch.classify(
        data, WIDTH, length, truncated, rows, match, ext_size, t.payload_type,
        MAX_PACKET, MAX_PAYLOAD, kind, seq, ts, ssrc, marker, rank,
    )  # fmt: skip
    fast = kind == FAST
    assert rounds == (int(rank[fast].max()) + 1 if fast.any() else 0)
    return rows, match, heard, kind, (seq, ts, ssrc, marker), rank


# --- hostile batches --------------------------------------------------------------------


@st.composite
def tables(draw) -> LegTable:  # noqa: ANN001
    """Up to five legs on three addresses: locked, unlocked or announced SSRCs, some
    hearing extensions, some with a block heard already."""
    t = LegTable(ExtensionEdges.columns(), 8)
    for row in range(draw(st.integers(0, 5))):
        announced = tuple(draw(st.lists(st.sampled_from(SSRCS), max_size=2, unique=True)))
        t.media.append(LegMedia(payload_type=0, dtmf_type=None, remote=None, announced=announced))
        t.dest[row] = draw(st.sampled_from(ADDRESSES))
        t.rx_ssrc[row] = draw(st.sampled_from([NO_SSRC, *SSRCS]))
        t.payload_type[row] = draw(st.sampled_from(PAYLOAD_TYPES))
        t.ext_in[row] = draw(st.booleans())
        if draw(st.booleans()):
            block = draw(st.sampled_from([b"\xbe\xde\x00\x01\x10ab\x00", b"\xbe\xde\x00\x00"]))
            t.ext_heard[row, : len(block)] = np.frombuffer(block, np.uint8)
            t.ext_heard_len[row] = len(block)
    t.update()
    return t


@st.composite
def packets(draw) -> tuple[bytes, int, bool, int]:  # noqa: ANN001
    """(bytes, length the kernel says, truncated, source): RTP as a link peer sends it,
    mutated, or garbage."""
    kind = draw(st.sampled_from(["rtp", "rtp", "rtp", "rtcp", "garbage", "short"]))
    if kind == "garbage":
        data = draw(st.binary(max_size=120))
    elif kind == "short":
        data = draw(st.binary(max_size=11))
    elif kind == "rtcp":
        data = bytes([0x80, 200, 0, 6]) + draw(st.sampled_from(SSRCS)).to_bytes(4, "big")
        data += draw(st.binary(max_size=24))
    else:
        b0 = draw(st.sampled_from([0x80, 0x90, 0x90, 0x91, 0xA0, 0x40]))
        b1 = draw(st.sampled_from(PAYLOAD_TYPES)) | (0x80 if draw(st.booleans()) else 0)
        data = bytes([b0, b1]) + draw(st.binary(min_size=6, max_size=6))
        data += draw(st.sampled_from(SSRCS)).to_bytes(4, "big")
        if b0 & 0x10:
            words = draw(st.sampled_from([0, 1, 2, 19, 20, 21, 40, 255, 65535]))
            block = b"\xbe\xde" + words.to_bytes(2, "big")
            element = draw(st.sampled_from([b"\x10ab\x00", b"\x10ac\x00", b"\x00" * 4]))
            block += element * min(words, 40)  # a length past the end: no more bytes
            data += block[: draw(st.integers(0, len(block)))] if draw(st.booleans()) else block
        data += draw(st.binary(max_size=draw(st.sampled_from([1, 40, 200]))))
    length = len(data)
    truncated = False
    if draw(st.integers(0, 9)) == 0:
        length, truncated = draw(
            st.sampled_from([(MAX_PACKET + 1, False), (WIDTH, True), (1600, False)])
        )
    source = draw(st.sampled_from([*ADDRESSES, STRANGER]))
    return data, length, truncated, source


def batch(items, stale: bytes):  # noqa: ANN001, ANN201
    """The receive buffer as recvmmsg leaves it: each packet at its slot's start, the
    slot's other bytes from earlier packets (``stale``)."""
    n = len(items)
    data = np.frombuffer((stale * (WIDTH * n // len(stale) + 1))[: WIDTH * n], np.uint8)
    data = data.reshape(n, WIDTH).copy()
    for i, (packet, _, _, _) in enumerate(items):
        data[i, : len(packet)] = np.frombuffer(packet, np.uint8)
    length = np.array([item[1] for item in items], np.int64)
    truncated = np.array([item[2] for item in items], bool)
    source = np.array([item[3] for item in items], np.int64)
    return data, length, truncated, source


def copy_table(t: LegTable) -> LegTable:
    twin = LegTable(ExtensionEdges.columns(), t.capacity)
    for name, *_ in twin.COLUMNS:
        getattr(twin, name)[:] = getattr(t, name)
    twin.media = [
        LegMedia(payload_type=0, dtmf_type=None, remote=None, announced=m.announced)
        for m in t.media
    ]
    twin.update()
    return twin


@SETTINGS
@given(
    tables(),
    st.lists(packets(), min_size=1, max_size=24),
    st.binary(min_size=1, max_size=64),
)
def test_the_c_batch_does_what_the_numpy_did(t: LegTable, items, stale: bytes) -> None:
    old_table, new_table = copy_table(t), copy_table(t)
    old_data, old_length, truncated, source = batch(items, stale)
    new_data, new_length = old_data.copy(), old_length.copy()
    old = old_batch(old_table, old_data, old_length, truncated, source)
    new = new_batch(new_table, new_data, new_length, truncated, source)
    rows, match, heard, kind, fields, rank = old
    assert new[0].tolist() == rows.tolist(), "the leg each packet belongs to"
    assert new[1].tolist() == match.tolist(), "how it matched"
    assert new[2] == heard, "the talker blocks handed over, in order"
    assert new[3].tolist() == kind.tolist(), "the drop class or path of each packet"
    fast = kind == FAST
    for old_field, new_field in zip(fields, new[4], strict=True):
        assert new_field[fast].tolist() == old_field[fast].tolist()
    assert new[5][fast].tolist() == rank[fast].tolist(), "rounds of distinct legs"
    assert new_length.tolist() == old_length.tolist(), "blocks taken out"
    for i in range(len(items)):
        end = min(int(old_length[i]), WIDTH)
        assert new_data[i, :end].tolist() == old_data[i, :end].tolist(), f"packet {i}"
    assert new_table.ext_heard_len.tolist() == old_table.ext_heard_len.tolist()
    assert new_table.ext_heard.tolist() == old_table.ext_heard.tolist()


def test_a_truncated_datagram_with_a_block_is_dropped_as_huge() -> None:
    """A datagram too big for its slot (MSG_TRUNC: 2048 bytes kept) from the link leg's
    own address and SSRC, with a talker block: counted as huge, its block handed over as
    before, and the packet after it in the batch goes the common path."""
    t = LegTable(ExtensionEdges.columns(), 4)
    t.media.append(LegMedia(payload_type=111, dtmf_type=None, remote=None))
    t.dest[0], t.rx_ssrc[0], t.payload_type[0], t.ext_in[0] = ADDRESSES[0], SSRCS[0], 111, True
    t.update()
    packet = bytes([0x90, 111, 0, 1, 0, 0, 0, 0]) + SSRCS[0].to_bytes(4, "big")
    packet += b"\xbe\xde\x00\x18" + b"\x10ab\x00" * 0x18 + b"\x01" * 2000
    good = bytes([0x80, 111, 0, 2, 0, 0, 0, 160]) + SSRCS[0].to_bytes(4, "big") + b"\x01"
    items = [(packet[:WIDTH], WIDTH, True, ADDRESSES[0]), (good, len(good), False, ADDRESSES[0])]
    old = old_batch(copy_table(t), *batch(items, b"\x00"))
    rows, match, heard, kind, fields, rank = new_batch(t, *batch(items, b"\x00"))
    assert kind.tolist() == old[3].tolist() == [HUGE, FAST]
    assert heard == old[2] == [(0, packet[12 : 12 + 4 + 4 * 0x18])]
    assert rows.tolist() == [0, 0] and match.tolist() == [EXACT, EXACT]
    assert fields[0][1] == 2 and rank[1] == 0


def test_the_c_loops_refuse_buffers_too_small() -> None:
    """A caller's mistake is a ValueError, never a read past a buffer."""
    t = LegTable(ExtensionEdges.columns(), 4)
    data = np.zeros((2, WIDTH), np.uint8)
    small = np.empty(1, np.int64)
    with pytest.raises(ValueError):
        _rtpbatch.lookup(
            data, WIDTH, np.zeros(2, np.int64), t._addresses, t._keys, t._key_rows, t._sole,
            small, small,
        )  # fmt: skip
    with pytest.raises(ValueError):
        _rtpbatch.lookup(
            data, WIDTH + 1, np.zeros(2, np.int64), t._addresses, t._keys, t._key_rows,
            t._sole, np.empty(2, np.int64), np.empty(2, np.int64),
        )  # fmt: skip


# --- the jitter bank's playout ------------------------------------------------------------


class OldJitterBank(JitterBank):
    """JitterBank with its put and playout as NumPy, as until #15 (the playout's
    ``self._last`` and ``last_pos`` as it kept them: the live rows' frames only)."""

    def __init__(self, capacity: int, frame: int) -> None:
        self._views: dict = {}
        super().__init__(capacity, frame)

    def _blocks(self, buffer: np.ndarray, width: int) -> np.ndarray:
        """View (rows, start, width) of a ring buffer: ``view[r, s]`` is samples s..s+width.

        Kept per buffer and width (``as_strided`` costs more than the copy it enables
        when only a few calls are up); ``grow`` makes new buffers, so new views."""
        key = (id(buffer), width)  # the cached view holds the buffer: its id stays unique
        view = self._views.get(key)
        if view is None:
            rows, length = buffer.shape
            step_row, step = buffer.strides
            view = as_strided(buffer, (rows, length - width + 1, width), (step_row, step, step))
            self._views[key] = view
        return view

    def _write(self, buffer: np.ndarray, rows: np.ndarray, starts: np.ndarray, values) -> None:
        """Write blocks (width ≤ TAIL) at ring positions ``starts`` of ``rows`` (distinct),
        keeping each row's tail copy of its head."""
        width = values.shape[1] if isinstance(values, np.ndarray) and values.ndim == 2 else None
        if width is None:
            raise ValueError("values must be (rows, width)")
        self._blocks(buffer, width)[rows, starts] = values
        wrapped = starts > RING - width
        head = starts < TAIL
        if wrapped.any() or head.any():
            tail = self._blocks(buffer, TAIL)
            if wrapped.any():  # the block ran past the end: its logical place is the head
                w = rows[wrapped]
                tail[w, 0] = tail[w, RING]
            if head.any():
                h = rows[head]
                tail[h, RING] = tail[h, 0]

    def _read(self, buffer: np.ndarray, rows: np.ndarray, starts: np.ndarray, width: int):
        return self._blocks(buffer, width)[rows, starts]

    # put ---------------------------------------------------------

    def put_batch(
        self,
        rows: np.ndarray,
        timestamps: np.ndarray,
        codes: np.ndarray,
        arrival: np.ndarray,
        marker: np.ndarray,
    ) -> np.ndarray:
        """Put one packet per row (rows all distinct, every payload ``codes.shape[1]`` long).

        Returns which were kept; a packet too late to be played is counted. A late
        packet with the marker bit is a talkspurt restarting the sender's clock:
        the row resyncs to it. So does one far ahead of the playout point.
        """
        k, n = codes.shape
        frame = self.frame
        play = self.play[rows]
        ext = play + ((timestamps - play + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        started = self.started[rows]
        fresh = self.fresh[rows]
        skip = np.where(fresh, 0, play - ext)
        restart = (
            ~started
            | (ext + n > play + RING - frame)  # far ahead: the sender's clock jumped
            | ((skip >= n) & marker)
        )
        if restart.any():
            r = rows[restart]
            again = r[self.started[r]]
            if again.size:
                self.have[again] = False
            ts = timestamps[restart]
            self.started[r] = self.fresh[r] = True
            self.base[r] = arrival[restart] - (ts + n)
            self.play[r] = ts
            self.transit[r] = 0.0
            self.count[r] = 0
            ext = np.where(restart, timestamps, ext)
            skip = np.where(restart, 0, skip)
        count = self.count[rows]
        end = ext + n
        self.transit[rows, count % HISTORY] = arrival - self.base[rows] - end
        self.count[rows] = count + 1
        self.last_arrival[rows] = arrival
        self.packet[rows] = n
        self.align[rows] = end % n
        late = skip >= n
        if late.any():
            r = rows[late]
            self.packets_late[r] += 1
            self.late_run[r] += 1
            gone = r[self.late_run[r] >= LATE_RESYNC]
            if gone.size:
                self.resync(gone)
            keep = ~late
            rows, ext, codes, skip = rows[keep], ext[keep], codes[keep], skip[keep]
        else:
            keep = np.ones(k, bool)
        self.late_run[rows] = 0
        starts = ext & (RING - 1)
        if (skip > 0).any():  # partly late: keep what was there before the playout point
            old = self._read(self.ring, rows, starts, n)
            ahead = np.arange(n) >= skip[:, None]
            codes = np.where(ahead, codes, old)
            present = ahead | self._read(self.have, rows, starts, n)
        else:
            present = np.ones((len(rows), n), bool)
        for offset in range(0, n, TAIL):  # packets longer than TAIL go in TAIL-sized pieces
            piece = slice(offset, min(n, offset + TAIL))
            at = (starts + offset) & (RING - 1)
            self._write(self.ring, rows, at, np.ascontiguousarray(codes[:, piece]))
            self._write(self.have, rows, at, np.ascontiguousarray(present[:, piece]))
        return keep

    def playout(self, rows, now, talking, table, law):  # noqa: ANN001, ANN201
        return old_playout(self, rows, now, talking, table, law)


def old_playout(self: OldJitterBank, rows, now, talking, table, law):  # noqa: ANN001, ANN201
    """JitterBank.playout as NumPy, until #15."""
    frame = self.frame
    out = np.zeros((len(rows), frame), np.float32)
    live = self.started[rows]
    if not live.any():
        return out
    r = rows[live]
    sel = dense(r)
    ordered = np.sort(self.transit[sel], axis=1)
    slowest = ordered[:, -TARGET_RANK]
    fastest = ordered[:, 0]
    local = now - self.base[sel]
    ready = np.floor(local - slowest - MARGIN).astype(np.int64)
    ready -= (ready - self.align[sel]) % self.packet[sel]
    target = ready - frame
    fresh = self.fresh[sel]
    play = np.where(fresh, target, self.play[sel])
    diff = target - play
    back = diff < 0
    creep = np.where(talking[live], CREEP_TALKING, frame)
    if self.whole.any():
        w = self.whole[sel] & talking[live]
        creep[w] = np.where(self.count[sel][w] % WHOLE_CREEP_EVERY == 0, frame, 0)
    forward = (diff > FORWARD_HYSTERESIS) & ~back
    step = np.where(back, diff, np.where(forward, np.minimum(diff, creep), 0))
    play_mod = play & (RING - 1)
    if forward.any():
        f = np.flatnonzero(forward)
        kept = self._read(self.have, r[f], play_mod[f], frame) & (np.arange(frame) >= step[f, None])
        self._write(self.have, r[f], play_mod[f], kept)
    play = play + step
    self.fresh[sel] = False
    start = play & (RING - 1)
    codes = self._read(self.ring, r, start, frame)
    present = self._read(self.have, r, start, frame)
    self._write(self.have, r, start, np.zeros((len(r), frame), bool))
    laws = law[sel]
    if (laws == laws[0]).all():
        pcm = table[laws[0]].take(codes)
    else:
        pcm = table.reshape(-1).take(codes + (laws * table.shape[1])[:, None])
    missing = ~present
    if missing.any():
        lost_rows = missing.any(axis=1)
        arrived = self.last_arrival[sel]
        recent = (now - arrived) < 10 * frame
        fade = self.fade[sel]
        k = np.flatnonzero(lost_rows)
        pos = self.last_pos[r[k]]
        last = self._last[np.maximum(pos, 0)] if len(self._last) else 0.0 * pcm[k]
        last *= ((pos >= 0) * fade[k])[:, None]
        pcm[k] = np.where(present[k], pcm[k], last)
        whole = missing.all(axis=1)
        self.fade[sel] = np.where(whole, fade * PLC_FADE, np.where(lost_rows, fade, 1.0))
        self.concealed[sel] += missing.sum(axis=1) * recent
    else:
        self.fade[sel] = 1.0
    self.last_pos[:] = -1
    self.last_pos[sel] = np.arange(len(r))
    self._last = pcm
    self.play[sel] = play + frame
    self.delay[sel] = local - frame - play - fastest
    out[live] = pcm
    return out


PLAYED = (
    *("ring", "have", "play", "started", "fresh", "base", "transit", "count"),
    *("last_arrival", "packet", "align", "packets_late", "late_run"),
    *("fade", "concealed", "delay"),
)


@pytest.mark.parametrize("seed", range(12))
def test_the_c_playout_plays_what_the_numpy_did(seed: int) -> None:
    """Six rows (G.711 µ-law and A-law, two whole-packet rows, 10 and 20 ms packets) fed
    with jitter, loss, reordering, duplicates, talkspurts, a sender's clock jump and a
    row that restarts; each tick both playouts give the same frames and leave the same
    state (the concealment of a gap repeats the same previous frame)."""
    rng = np.random.default_rng(seed)
    frame = int(rng.choice([80, 160]))
    banks = [OldJitterBank(8, frame), JitterBank(8, frame)]
    law = np.array([0, 1, 0, 1, 0, 0, 0, 0], np.int64)
    rows = np.array([0, 1, 2, 3, 5, 6], np.int64)
    for bank in banks:
        bank.whole[[2, 6]] = True
    packet = {0: 160, 1: 80, 2: frame, 3: 160, 5: 160, 6: frame}
    sent = dict.fromkeys(packet, 0)
    ts0 = {row: int(rng.integers(0, 2**32)) for row in packet}
    pending: list[tuple[float, int, int, np.ndarray, bool]] = []
    jitter = rng.uniform(0, 30 * 8)
    for tick in range(400):
        now = 1000.0 + tick * frame + rng.uniform(0, 8)
        for row, n in packet.items():  # each row sends what its clock has made by now
            while sent[row] + n <= tick * frame:
                ts = (ts0[row] + sent[row]) & 0xFFFFFFFF
                codes = rng.integers(0, 256, n).astype(np.uint8)
                if rng.random() > 0.05:  # 5 % lost
                    arrive = tick * frame + 1000.0 + rng.uniform(0, jitter)
                    marker = rng.random() < 0.02
                    pending.append((arrive, row, ts, codes, marker))
                    if rng.random() < 0.02:  # and a duplicate
                        pending.append((arrive + 40, row, ts, codes, False))
                sent[row] += n
        if tick == 200:
            ts0[5] += 123_456  # the sender's clock jumps
        if tick == 300:
            for bank in banks:
                bank.resync(3)
        due = sorted((p for p in pending if p[0] <= now), key=lambda p: p[0])
        pending = [p for p in pending if p[0] > now]
        for bank in banks:
            for arrive, row, ts, codes, marker in due:
                bank.put_batch(
                    np.array([row]), np.array([ts]), codes[None, :], np.array([arrive]),
                    np.array([marker]),
                )  # fmt: skip
        talking = rng.random(len(rows)) < 0.5
        old = banks[0].playout(rows, now, talking, DECODE, law)
        new = banks[1].playout(rows, now, talking, DECODE, law)
        assert new.tolist() == old.tolist(), f"tick {tick}"
        for name in PLAYED:
            assert getattr(banks[1], name).tolist() == getattr(banks[0], name).tolist(), name
    assert banks[1].concealed.sum() > 0 and banks[1].packets_late.sum() >= 0


# --- the send batch -----------------------------------------------------------------------


def old_write_headers(packets, payload_type, first, seq, ts, ssrc) -> None:  # noqa: ANN001
    count = len(packets)
    packets[:, 0] = 0x80
    packets[:, 1] = payload_type | (first.astype(np.uint8) << 7)
    packets[:, 2:4] = seq.astype(">u2").view(np.uint8).reshape(count, 2)
    packets[:, 4:8] = ts.astype(">u4").view(np.uint8).reshape(count, 4)
    packets[:, 8:12] = ssrc.astype(">u4").view(np.uint8).reshape(count, 4)


def old_attach(t, packets, sel, size):  # noqa: ANN001, ANN201
    ext = t.ext_len[sel]
    if not ext.any():
        return packets, None
    count, width = packets.shape
    wider = np.zeros((count, width + int(ext.max())), np.uint8)
    wider[:, :width] = packets
    blocks = t.ext_block[sel]
    end = size if isinstance(size, int) else width
    for s in np.unique(ext[ext > 0]).tolist():
        pick = np.flatnonzero(ext == s)
        wider[pick, 12 + s : end + s] = packets[pick, 12:end]
        wider[pick, 12 : 12 + s] = blocks[pick, :s]
        wider[pick, 0] |= 0x10
    return wider, size + ext


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("opus", [False, True])
def test_the_c_build_sends_what_the_numpy_built(seed: int, opus: bool) -> None:
    """Legs with and without a talker block, first packets, wrapping counters: the same
    bytes on the wire; G.711 (the payload already in place) and Opus (payloads of their
    own length, None for the silence)."""
    rng = np.random.default_rng(seed)
    t = LegTable(ExtensionEdges.columns() + SendPath.columns(160, None), 12)
    ext = ExtensionEdges(t)
    for row in range(12):
        t.payload_type[row] = int(rng.choice([0, 8, 96, 111]))
        t.tx_first[row] = rng.random() < 0.3
        t.tx_seq[row] = int(rng.choice([0, 0xFFFF, rng.integers(0, 0x10000)]))
        t.tx_ts[row] = int(rng.choice([0, 0xFFFFFFFF, rng.integers(0, 2**32)]))
        t.tx_ssrc[row] = int(rng.integers(0, 2**32))
        if rng.random() < 0.5:
            ext.set_extension(row, rng.bytes(4 * int(rng.integers(1, 21))))
    rows = np.sort(rng.choice(12, int(rng.integers(1, 13)), replace=False)).astype(np.int64)
    count = len(rows)
    silence = b"\xf8"
    if opus:
        payloads = [
            None if rng.random() < 0.4 else rng.bytes(int(rng.integers(2, 90)))
            for _ in range(count)
        ]
        sizes = np.array([12 + len(silence if p is None else p) for p in payloads])
        plain = np.zeros((count, int(sizes.max())), np.uint8)
        plain[:, 12] = silence[0]
        for i, p in enumerate(payloads):
            if p is not None:
                plain[i, 12 : 12 + len(p)] = np.frombuffer(p, np.uint8)
        old_size = sizes
    else:
        payloads = None
        plain = np.zeros((count, 12 + 80), np.uint8)
        plain[:, 12:] = rng.integers(0, 256, (count, 80))
        sizes = np.full(count, 92)
        old_size = 92
    old_write_headers(
        plain, t.payload_type[rows], t.tx_first[rows], t.tx_seq[rows], t.tx_ts[rows],
        t.tx_ssrc[rows],
    )  # fmt: skip
    old, with_ext = old_attach(t, plain, rows, old_size)
    old_lengths = np.broadcast_to(sizes if with_ext is None else with_ext, (count,))
    width = int(sizes.max()) + 80 + 10
    packets = np.zeros((count, width), np.uint8)
    if not opus:
        packets[:, 12:92] = plain[:, 12:92]
    lengths = np.empty(count, np.int64)
    _rtpbatch.build(
        packets, width, payloads, silence, sizes - 12, rows, t.payload_type, t.tx_first,
        t.tx_seq, t.tx_ts, t.tx_ssrc, t.ext_len, t.ext_block, lengths,
    )  # fmt: skip
    assert lengths.tolist() == old_lengths.tolist()
    for i in range(count):
        assert bytes(packets[i, : lengths[i]]) == bytes(old[i, : lengths[i]]), f"packet {i}"


def test_the_c_build_refuses_a_packet_wider_than_its_row() -> None:
    t = LegTable(ExtensionEdges.columns() + SendPath.columns(160, None), 2)
    ExtensionEdges(t).set_extension(0, bytes(80))
    packets = np.zeros((1, 100), np.uint8)
    with pytest.raises(ValueError):
        _rtpbatch.build(
            packets, 100, [bytes(20)], b"\xf8", np.zeros(1, np.int64), np.zeros(1, np.int64),
            t.payload_type, t.tx_first, t.tx_seq, t.tx_ts, t.tx_ssrc, t.ext_len, t.ext_block,
            np.empty(1, np.int64),
        )  # fmt: skip


# --- SRTP in place --------------------------------------------------------------------------


def test_srtp_rows_protect_and_check_in_place_and_report_forgeries_and_replays() -> None:
    """Protected by the C loop, checked by it with the peer's key: the same packets back;
    a packet seen before fails the replay check, a flipped bit fails authentication, and
    neither is changed or raises."""
    ours, theirs = new_crypto().key, new_crypto().key
    sender, receiver = LegSrtp(theirs, ours), LegSrtp(ours, theirs)
    plain = [
        build_header(111, i == 0, 100 + i, 960 * i, 0xCAFE) + bytes([i]) * 40 for i in range(5)
    ]
    packets = np.zeros((5, 120), np.uint8)
    for i, packet in enumerate(plain):
        packets[i, : len(packet)] = np.frombuffer(packet, np.uint8)
    contexts = np.full(5, sender.tx_address, np.int64)
    lengths = protect_rows(packets, np.arange(5), contexts, 52)
    assert lengths.tolist() == [52 + TAG] * 5
    wire = [bytes(packets[i, : lengths[i]]) for i in range(5)]
    data = np.zeros((6, 2048), np.uint8)
    for i, packet in enumerate([*wire[:4], wire[1], wire[4]]):
        data[i, : len(packet)] = np.frombuffer(packet, np.uint8)
    data[5, 30] ^= 1  # packet 4, forged
    length = np.full(6, 52 + TAG, np.int64)
    status = unprotect_rows(
        data, np.arange(6), np.full(6, receiver.rx_address, np.int64), length, np.zeros(6, bool)
    )
    assert status.tolist() == [0, 0, 0, 0, REPLAY_FAIL, AUTH_FAIL]
    assert length.tolist() == [52] * 4 + [52 + TAG] * 2
    for i in range(4):
        assert bytes(data[i, :52]) == plain[i]
    with pytest.raises(ValueError):  # no room for the tag: refused, nothing written past
        protect_rows(packets, np.arange(1), contexts[:1], 115)


def test_a_libsrtp_call_of_another_signature_is_refused_not_called() -> None:
    """The batch calls libsrtp by address as libsrtp 2 declares it; a pylibsrtp on another
    signature (libsrtp 3 changed these calls) must stop the import, not corrupt packets."""
    assert _address("srtp_protect") > 0
    with pytest.raises(ImportError, match="srtp_dealloc is .* not libsrtp 2's"):
        _address("srtp_dealloc")  # (srtp_t): one argument, not three
