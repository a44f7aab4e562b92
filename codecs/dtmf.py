"""Streaming DTMF detection (ITU-T Q.23 signals, Q.24 reception rules).

SIP callers key the radio and dial patches with DTMF, so the detector must
catch every real press in noisy, companded audio and never fire on speech
("talk-off"): radio voice is loud and long, and one false digit can key a
transmitter.

Analysis: 13.25 ms blocks (106 samples at 8 kHz) every 6.6 ms (50 %
overlap). Each block's power at the eight DTMF frequencies and their second
harmonics is a single-bin DFT — what Goertzel computes — done for all
blocks and all sixteen frequencies as one matrix product. A block is a
*candidate* for a key when:

* both the strongest row and column tone are above ``min_level_dbfs``;
* twist: the low group may be up to 8 dB louder than the high group, the
  high group up to 4 dB louder than the low (Q.24 / Bellcore windows);
* each winner beats the other tones of its group by ``relative_peak_db``;
* second harmonics stay ``harmonic_db`` below their fundamentals — speech
  is harmonic-rich, DTMF is two pure tones. Checked for every column tone
  and for row 941 Hz; the second harmonics of 697/770/852 Hz (1394/1540/
  1704 Hz) lie within one 75 Hz bin of a column tone, which a 13 ms block
  cannot resolve, so for those rows the energy-ratio test carries the load;
* the two tones hold at least ``energy_ratio`` of the block's energy.

Timing: a block is *full* when its tone power is within 3 dB of the loudest
block of the run, i.e. the tone fills more than ~70 % of it. A key goes down
after four full blocks in an unbroken run of the same key, which a 40 ms
tone always yields and a 23 ms tone never can (at most three blocks have that
fill). It comes up after four blocks that are not within 6 dB of the press
level, so a ≤10 ms interruption (at most two such blocks) does not split a
press, while a 40 ms pause (six or more) always ends it.
"""

from __future__ import annotations

import numpy as np

from .goertzel import BinBank
from .tones import DTMF_COLS, DTMF_KEYS, DTMF_ROWS

_BLOCK_S = 0.01325
_FULL_FRACTION = 0.5  # -3 dB: tone fills ≥ ~71 % of the block
_HELD_FRACTION = 0.25  # -6 dB: below this, the press is not sounding in this block
_BLOCKS_DOWN = 4
_BLOCKS_UP = 4
# Only 2 x 941 Hz = 1882 Hz is clear of the column tones (see module docstring).
_ROW_HARMONIC_RESOLVABLE = np.array([False, False, False, True])
_KEY_GRID = np.array([list(keys) for keys in DTMF_KEYS])


class DtmfDetector:
    """Feed float32 frames of any length; get each key press once, when it is confirmed."""

    def __init__(
        self,
        rate: int,
        *,
        min_level_dbfs: float = -36.0,
        normal_twist_db: float = 8.0,
        reverse_twist_db: float = 4.0,
        relative_peak_db: float = 8.0,
        harmonic_db: float = 15.0,
        energy_ratio: float = 0.6,
    ) -> None:
        self.rate = int(rate)
        if self.rate < 7000:
            raise ValueError("DTMF needs a sample rate of at least 7 kHz (1633 Hz 2nd harmonic)")
        self._hop = max(1, round(_BLOCK_S * self.rate / 2))
        self._n = 2 * self._hop
        freqs = np.array(DTMF_ROWS + DTMF_COLS)
        freqs = np.concatenate([freqs, 2 * freqs])
        self._bank = BinBank(freqs, self._hop, self.rate)
        self._shift = np.exp(-2j * np.pi * freqs * self._hop / self.rate)
        self._min_power = 10 ** (min_level_dbfs / 10)  # mean square of a tone at that RMS
        self._normal_twist = 10 ** (normal_twist_db / 10)
        self._reverse_twist = 10 ** (reverse_twist_db / 10)
        self._relative_peak = 10 ** (relative_peak_db / 10)
        self._harmonic = 10 ** (-harmonic_db / 10)
        self._energy_ratio = energy_ratio

        self._buf = np.zeros(0, dtype=np.float32)
        self._run_key: str | None = None
        self._run_powers: list[float] = []
        self._held: str | None = None
        self._held_power = 0.0
        self._weak_blocks = 0

    @property
    def held(self) -> str | None:
        """The key currently pressed (useful for press-and-hold PTT), or None."""
        return self._held

    @property
    def block_ms(self) -> float:
        """Analysis block length; decisions move in steps of half of it."""
        return 1000.0 * self._n / self.rate

    def feed(self, frame: np.ndarray) -> list[str]:
        """Consume a frame; return keys whose press was confirmed within it, in order."""
        buf = np.concatenate((self._buf, np.asarray(frame, dtype=np.float32).ravel()))
        count = (len(buf) - self._n) // self._hop + 1
        if count <= 0:
            self._buf = buf
            return []
        # Blocks overlap by half, so analyse half-blocks once and combine neighbours.
        halves = buf[: (count + 1) * self._hop].reshape(count + 1, self._hop).astype(np.float64)
        self._buf = buf[count * self._hop :]
        energy = np.einsum("ij,ij->i", halves, halves)
        total = (energy[:-1] + energy[1:]) / self._n
        if 2.0 * float(total.max()) < self._min_power:
            # No tone can reach the threshold (single-bin power ≤ 2 × mean square): idle leg.
            keys, ok, powers = [""] * count, np.zeros(count, bool), np.zeros(count)
        else:
            h = self._bank(halves)
            keys, ok, powers = self._classify(h[:-1] + h[1:] * self._shift, total)
        events: list[str] = []
        for key, good, power in zip(keys, ok, powers, strict=True):  # a few blocks per frame
            pressed = self._step(str(key) if good else None, float(power))
            if pressed:
                events.append(pressed)
        return events

    def _classify(
        self, values: np.ndarray, total: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per block: strongest key, whether it passes every check, and its tone power."""
        spec = self._bank.power(values) / 4.0  # values span two half-blocks: (2·hop)² norm
        rows, cols, harm = spec[:, :4], spec[:, 4:8], spec[:, 8:]
        r = np.argmax(rows, axis=1)
        c = np.argmax(cols, axis=1)
        idx = np.arange(len(spec))
        pr, pc = rows[idx, r], cols[idx, c]
        other_r = np.sort(rows, axis=1)[:, -2]
        other_c = np.sort(cols, axis=1)[:, -2]
        ok = (
            (pr >= self._min_power)
            & (pc >= self._min_power)
            & (pr <= pc * self._normal_twist)
            & (pc <= pr * self._reverse_twist)
            & (pr >= other_r * self._relative_peak)
            & (pc >= other_c * self._relative_peak)
            & ((harm[idx, r] <= pr * self._harmonic) | ~_ROW_HARMONIC_RESOLVABLE[r])
            & (harm[idx, 4 + c] <= pc * self._harmonic)
            & ((pr + pc) >= self._energy_ratio * total)
        )
        return _KEY_GRID[r, c], ok, pr + pc

    def _step(self, key: str | None, power: float) -> str | None:
        """Advance the Q.24 timing state by one block; return a key on confirmed key-down."""
        if key is not None and key == self._run_key:
            self._run_powers.append(power)
        else:
            self._run_key = key
            self._run_powers = [power] if key is not None else []

        if self._held is not None:
            sounding = key == self._held and power >= _HELD_FRACTION * self._held_power
            self._weak_blocks = 0 if sounding else self._weak_blocks + 1
            if self._weak_blocks >= _BLOCKS_UP:
                self._held = None
                # A press that faded and came back must be re-earned from fresh blocks.
                self._run_key, self._run_powers = None, []
            return None

        if self._run_key is None:
            return None
        peak = max(self._run_powers)
        if sum(p >= _FULL_FRACTION * peak for p in self._run_powers) >= _BLOCKS_DOWN:
            self._held, self._held_power, self._weak_blocks = self._run_key, peak, 0
            return self._held
        return None
