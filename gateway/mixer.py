"""The N-1 mix: one vectorised step per tick over every mix group at once.

Each listener hears the sum of its group's admitted talkers minus its own
signal. A *link* listener (a cross-border trunk leg) hears the sum minus every
link talker, not only itself: a link carries only audio that originated on its
own side, so three sites in a chain or a mesh hear each other exactly once. A
leg of a talkgroup its site *relays* (``gateway.links.topology``) is left out of
the ``link`` mask by the engine, so it hears the ordinary N-1.

Work is done on (ports × samples) arrays so the cost grows with the
number of samples actually mixed, not with Python work per sample; the only
per-port Python work in a tick is the engine calling each port's read/write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse


@dataclass
class MixResult:
    out: np.ndarray  # (ports, samples); rows valid only where audible
    audible: np.ndarray  # (ports,) bool: someone else in the group is heard
    group_sum: np.ndarray  # (groups, samples): the mix every non-talking listener hears
    talkers: np.ndarray  # (groups,) admitted talkers per group


class Limiter:
    """Per-listener peak limiter: sums of several talkers never wrap or clip harshly.

    When a frame would exceed ``threshold`` the gain drops over the first ~1 ms of
    that frame and then holds; it recovers at ``release_db_per_s``, one small step
    per frame (0.4 dB at 20 ms), ramped over the same 1 ms so it never clicks. Only
    that first millisecond can overshoot, so the final clip touches only it.
    Everything after the ramp is one multiply per sample: with hundreds of callers
    talking at once this runs on every listener's row each tick.
    """

    def __init__(
        self, frame_samples: int, rate: int, threshold: float = 0.89, release_db_per_s: float = 20.0
    ) -> None:
        self.threshold = threshold
        frame_s = frame_samples / rate
        self.release = 10 ** (release_db_per_s * frame_s / 20)
        self.ramp_samples = min(frame_samples, max(1, int(0.001 * rate)))
        self.ramp = ((np.arange(self.ramp_samples) + 1) / self.ramp_samples).astype(np.float32)
        self.gain = np.ones(0, np.float32)

    def resize(self, ports: int, keep: np.ndarray | None = None) -> None:
        """Start a new port layout; ``keep[i]`` is the old row of new port i, or -1."""
        gain = np.ones(ports, np.float32)
        if keep is not None and self.gain.size:
            has_old = keep >= 0
            gain[has_old] = self.gain[keep[has_old]]
        self.gain = gain

    def apply(self, out: np.ndarray, rows: np.ndarray) -> None:
        if rows.size == 0:
            return
        every_row = rows.size == len(out)
        block = out if every_row else out[rows]
        peak = np.maximum(block.max(axis=1), -block.min(axis=1))
        before = self.gain[rows]
        # Most listeners are below threshold at unity gain: leave those rows alone.
        act = np.flatnonzero((peak > self.threshold) | (before < 1.0))
        if act.size == 0:
            return
        target = np.minimum(1.0, self.threshold / np.maximum(peak[act], 1e-9)).astype(np.float32)
        was = before[act]
        now = np.minimum(target, was * np.float32(self.release))
        self.gain[rows[act]] = now
        # Rows that act are gathered only when few do; otherwise the whole block is
        # scaled in place (a row that does not act has gain 1 before and after).
        whole = act.size * 2 >= len(block)
        if whole:
            was_rows, now_rows = before.copy(), before.copy()
            was_rows[act], now_rows[act] = was, now
            part = block
        else:
            was_rows, now_rows, part = was, now, block[act]
        r = self.ramp_samples
        head = part[:, :r]
        head *= was_rows[:, None] + (now_rows - was_rows)[:, None] * self.ramp
        np.clip(head, -1.0, 1.0, out=head)
        part[:, r:] *= now_rows[:, None]
        if whole:
            act = np.arange(len(block))
        else:
            block[act] = part
        if not every_row:
            out[rows[act]] = block[act]


DENSE_LIMIT = 4096  # groups × talkers up to which a dense product beats building a sparse one


class Mixer:
    def __init__(self, frame_samples: int, rate: int) -> None:
        self.frame_samples = frame_samples
        self.limiter = Limiter(frame_samples, rate)
        self._out = np.zeros((0, frame_samples), np.float32)

    def resize(self, ports: int, keep: np.ndarray | None = None) -> None:
        self._out = np.zeros((ports, self.frame_samples), np.float32)
        self.limiter.resize(ports, keep)

    def mix(
        self,
        frames: np.ndarray,
        weights: np.ndarray,
        groups: np.ndarray,
        n_groups: int,
        out_gain: np.ndarray,
        link: np.ndarray | None = None,
    ) -> MixResult:
        """Mix one tick.

        frames:   (P, N) float32 received audio, one row per port
        weights:  (P,) float32 input gain of admitted talkers, 0 for everyone else
        groups:   (P,) int mix group of each port; ``n_groups`` means "in none"
        out_gain: (P,) float32 gain applied to what each port hears
        link:     (P,) bool, or None when no port is a link: these hear no link talker
        """
        talker_rows = np.flatnonzero(weights)
        if talker_rows.size == 0:  # nobody talks (most ticks of a site): nobody hears anything
            return MixResult(
                self._out,
                np.zeros(len(weights), bool),
                np.zeros((n_groups, self.frame_samples), np.float32),
                np.zeros(n_groups, np.int64),
            )
        talker_groups = groups[talker_rows]
        talkers = np.bincount(talker_groups, minlength=n_groups + 1)
        talkers[n_groups] = 0
        group_sum = self._group_sums(frames, weights, talker_rows, talker_groups, n_groups + 1)
        group_sum[n_groups] = 0.0
        is_talker = weights != 0
        audible = (talkers[groups] - is_talker) > 0
        links = None
        if link is not None and link.any():
            # Sum the link talkers of each group too; link listeners hear the rest only.
            link_rows = talker_rows[link[talker_rows]]
            link_groups = groups[link_rows]
            link_talkers = np.bincount(link_groups, minlength=n_groups + 1)
            link_talkers[n_groups] = 0
            links = np.flatnonzero(link)
            audible[links] = (talkers - link_talkers)[groups[links]] > 0

        out = self._out
        rows = np.flatnonzero(audible)
        if rows.size == len(out):
            np.take(group_sum, groups, axis=0, out=out)
        else:
            out[rows] = group_sum[groups[rows]]
        if links is not None:
            heard = links[audible[links]]
            if heard.size and link_rows.size:
                link_sum = self._group_sums(frames, weights, link_rows, link_groups, n_groups + 1)
                out[heard] -= link_sum[groups[heard]]  # a link talker's own row is in it too
            own_ok = audible[talker_rows] & ~link[talker_rows]
        else:
            own_ok = audible[talker_rows]
        own = talker_rows[own_ok]  # N-1: never hear yourself
        if own.size == len(out) and (weights == 1.0).all():
            out -= frames
        elif own.size:
            out[own] -= frames[own] * weights[own, None]
        listener_gain = out_gain[rows]
        if (listener_gain != 1.0).any():
            out[rows] *= listener_gain[:, None]
        self.limiter.apply(out, rows)
        return MixResult(out, audible, group_sum[:n_groups], talkers[:n_groups])

    @staticmethod
    def _group_sums(
        frames: np.ndarray, weights: np.ndarray, rows: np.ndarray, groups: np.ndarray, n: int
    ) -> np.ndarray:
        """Sum each group's talkers: a (groups × talkers) matrix times their frames.

        Small sites use a dense matrix (tens of µs); large ones a sparse matrix,
        whose cost follows the number of talkers and not groups × talkers.
        """
        if n * rows.size <= DENSE_LIMIT:
            selector = np.zeros((n, rows.size), np.float32)
            selector[groups, np.arange(rows.size)] = weights[rows]
            talking = frames if rows.size == len(frames) else frames[rows]  # no copy if all talk
            return selector @ talking
        order = np.argsort(groups, kind="stable")
        indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(groups, minlength=n), out=indptr[1:])
        selector = sparse.csr_matrix(
            (weights[rows[order]], rows[order], indptr), shape=(n, len(weights))
        )
        return np.asarray(selector @ frames, dtype=np.float32)
