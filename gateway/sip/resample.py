"""8 kHz telephone audio to and from the engine rate, for many legs in one matrix product.

Why not ``gateway.codecs.resample``: that is one stream per object, and at hundreds
of legs a per-leg call per tick is the cost to avoid. G.711 is always 8 kHz and
the engine rate is a whole multiple of it, so one fixed polyphase filter serves
every leg: a frame is cut into blocks of ``block`` input samples, each block plus
its filter history is one row of a matrix, and a single product with a constant
weight matrix resamples every block of every leg at once.

The kernel is a Kaiser-windowed sinc; its half-width (in 8 kHz samples) is all the
latency it adds (1 ms by default) — no FFT engine holding back tens of ms.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def _kernel(tau: np.ndarray, half_width: int, cutoff: float, beta: float) -> np.ndarray:
    """Windowed sinc at positions ``tau`` (in 8 kHz samples), zero outside ±half_width."""
    u = tau / half_width
    inside = np.abs(u) < 1.0
    window = np.where(
        inside, np.i0(beta * np.sqrt(np.clip(1.0 - u * u, 0.0, 1.0))) / np.i0(beta), 0.0
    )
    return cutoff * np.sinc(cutoff * tau) * window


class BlockResampler:
    """Integer-factor up- (8 kHz → rate) or down-sampler (rate → 8 kHz) for rows of frames.

    History is kept by the caller per row (``history_length`` samples of the
    input rate), so rows can come and go without this object knowing legs.
    """

    def __init__(
        self,
        factor: int,
        frame_8k: int,
        up: bool,
        half_width: int = 8,
        cutoff: float = 0.92,
        beta: float = 7.0,
        block: int = 16,
    ) -> None:
        if frame_8k % block:
            block = next(b for b in (20, 10, 8, 5, 4, 2, 1) if frame_8k % b == 0)
        self.factor = factor
        self.up = up
        self.blocks = frame_8k // block
        m, h, b = factor, half_width, block
        if up:
            self.n_in, self.n_out = frame_8k, frame_8k * m
            self.history_length = 2 * h
            self.step = b
            i = np.arange(b + 2 * h)[:, None]
            j = np.arange(b * m)[None, :]
            tau = (j // m) - i + (j % m) / m + h
            weights = _kernel(tau, h, cutoff, beta)
        else:
            self.n_in, self.n_out = frame_8k * m, frame_8k
            self.history_length = 2 * h * m
            self.step = b * m
            i = np.arange((b + 2 * h) * m)[:, None]
            j = np.arange(b)[None, :]
            tau = i / m - h - j
            weights = _kernel(tau, h, cutoff, beta)
        # Unity gain at DC for every output phase, so the level cannot ripple per sample.
        weights /= weights.sum(axis=0, keepdims=True)
        self.window = weights.shape[0]
        self.weights = weights.astype(np.float32)
        self.delay_8k = h  # latency in 8 kHz samples

    def process(self, x: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows × n_in) frames and their histories → (rows × n_out) frames, new histories."""
        rows = x.shape[0]
        ext = np.empty((rows, self.history_length + self.n_in), np.float32)
        ext[:, : self.history_length] = history
        ext[:, self.history_length :] = x
        return self.process_ext(ext), ext[:, -self.history_length :]

    def process_ext(self, ext: np.ndarray) -> np.ndarray:
        """Rows laid out as history then frame (rows × (history_length + n_in)) → frames.

        For callers that keep each row's history just before its frame in one buffer
        (no copy to join them); moving the new history into place is theirs."""
        rows = ext.shape[0]
        s_row, s_col = ext.strides
        windows = as_strided(
            ext, (rows, self.blocks, self.window), (s_row, s_col * self.step, s_col)
        )
        return (windows.reshape(rows * self.blocks, self.window) @ self.weights).reshape(rows, -1)
