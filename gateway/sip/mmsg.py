"""Many UDP datagrams per system call: ``recvmmsg``/``sendmmsg`` through ctypes, on NumPy arrays.

Why: at hundreds of legs, one ``recvmsg``/``sendto`` per packet from Python costs
more than everything else a leg does in a tick. Python's socket module has
neither call, so they are called on libc directly. Every structure the kernel
reads or writes — ``mmsghdr``, ``iovec``, ``sockaddr_in`` and the control
buffer holding each datagram's kernel receive time (``SO_TIMESTAMPNS``) — lives
in a preallocated NumPy structured array, and packet bytes in one 2-D uint8
buffer, so the results are columns the caller reads vectorised (source address,
length, arrival time) with no per-packet Python at all.

Linux on a 64-bit CPU only (the structure layouts below are those of the
x86-64/arm64 ABI); anything else is refused at construction with that reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket
import sys
import time

import numpy as np

MSG_DONTWAIT = 0x40
MSG_TRUNC = 0x20
SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: a 64-bit timespec on 64-bit ABIs
SOCKADDR_SIZE = 16
CONTROL_SIZE = 32  # CMSG_SPACE(sizeof(struct timespec))

MMSGHDR = np.dtype(
    [
        ("name", np.uint64),
        ("namelen", np.uint32),
        ("_pad0", np.uint32),
        ("iov", np.uint64),
        ("iovlen", np.uint64),
        ("control", np.uint64),
        ("controllen", np.uint64),
        ("flags", np.int32),
        ("_pad1", np.int32),
        ("len", np.uint32),
        ("_pad2", np.uint32),
    ]
)
IOVEC = np.dtype([("base", np.uint64), ("len", np.uint64)])
SOCKADDR_IN = np.dtype(
    [("family", np.uint16), ("port", ">u2"), ("addr", ">u4"), ("zero", np.uint64)]
)
TIMESTAMP_CMSG = np.dtype(
    [
        ("len", np.uint64),
        ("level", np.int32),
        ("type", np.int32),
        ("sec", np.int64),
        ("nsec", np.int64),
    ]
)


def _libc():
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise OSError(
            "SIP media needs Linux on a 64-bit CPU (recvmmsg/sendmmsg with the LP64 layout)"
        )
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for name in ("recvmmsg", "sendmmsg"):
        fn = getattr(libc, name)
        fn.restype = ctypes.c_int
    libc.recvmmsg.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint,
        ctypes.c_int,
        ctypes.c_void_p,
    ]
    libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    return libc


_LIBC = None


def libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc()
    return _LIBC


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def address_key(host: str, port: int) -> int:
    """An IPv4 address and port as one integer (the demultiplexing key)."""
    return (int.from_bytes(socket.inet_aton(host), "big") << 16) | port


def key_address(key: int) -> tuple[str, int]:
    return socket.inet_ntoa((key >> 16).to_bytes(4, "big")), key & 0xFFFF


class BatchReceiver:
    """Drains a non-blocking UDP socket with ``recvmmsg``, ``slots`` datagrams per call.

    After :meth:`receive` returns ``n``, rows ``[:n]`` of ``data``, ``length``,
    ``truncated``, ``source`` (address key) and ``arrival_ns`` (kernel receive
    time, wall clock in ns) describe the datagrams, in arrival order.
    """

    def __init__(self, sock: socket.socket, slots: int = 1024, size: int = 2048) -> None:
        self.lib = libc()
        self.sock = sock
        self.fd = sock.fileno()
        self.slots = slots
        self.size = size
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        self.data = np.zeros((slots, size), np.uint8)
        self.names = np.zeros(slots, SOCKADDR_IN)
        self.control = np.zeros(slots, TIMESTAMP_CMSG)
        self.iov = np.zeros(slots, IOVEC)
        self.headers = np.zeros(slots, MMSGHDR)
        self.iov["base"] = _address(self.data) + np.arange(slots, dtype=np.uint64) * size
        self.iov["len"] = size
        self.headers["name"] = _address(self.names) + np.arange(slots, dtype=np.uint64) * 16
        self.headers["iov"] = _address(self.iov) + np.arange(slots, dtype=np.uint64) * 16
        self.headers["iovlen"] = 1
        self.headers["control"] = (
            _address(self.control) + np.arange(slots, dtype=np.uint64) * CONTROL_SIZE
        )
        self._pointer = _address(self.headers)
        self.errors = 0
        self.syscall_seconds = 0.0  # CPU spent inside recvmmsg (the kernel's share)

    def receive(self) -> int:
        """Read up to ``slots`` queued datagrams (never blocks); how many were read."""
        headers = self.headers
        headers["namelen"] = SOCKADDR_SIZE
        headers["controllen"] = CONTROL_SIZE
        started = time.thread_time()
        n = self.lib.recvmmsg(self.fd, self._pointer, self.slots, MSG_DONTWAIT, None)
        self.syscall_seconds += time.thread_time() - started
        if n < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.EINTR):
                self.errors += 1  # ICMP errors queued on the socket (a phone went away)
            return 0
        return n

    def columns(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(length, truncated, source key, arrival ns) of the first ``n`` datagrams."""
        headers = self.headers[:n]
        length = headers["len"].astype(np.int64)
        truncated = (headers["flags"] & MSG_TRUNC) != 0
        names = self.names[:n]
        source = (names["addr"].astype(np.int64) << 16) | names["port"].astype(np.int64)
        control = self.control[:n]
        stamped = (
            (headers["controllen"] >= CONTROL_SIZE)
            & (control["level"] == socket.SOL_SOCKET)
            & (control["type"] == SO_TIMESTAMPNS)
        )
        arrival = control["sec"] * 1_000_000_000 + control["nsec"]
        if not stamped.all():
            arrival = np.where(stamped, arrival, time.time_ns())
        return length, truncated, source, arrival


class BatchSender:
    """Sends rows of one 2-D packet buffer to per-row addresses with ``sendmmsg``."""

    def __init__(self, sock: socket.socket, slots: int = 1024) -> None:
        self.lib = libc()
        self.sock = sock
        self.fd = sock.fileno()
        self._allocate(slots)
        self.errors = 0
        self.syscall_seconds = 0.0  # CPU spent inside sendmmsg (on loopback: delivery too)

    def _allocate(self, slots: int) -> None:
        self.slots = slots
        self.names = np.zeros(slots, SOCKADDR_IN)
        self.names["family"] = socket.AF_INET
        self.iov = np.zeros(slots, IOVEC)
        self.headers = np.zeros(slots, MMSGHDR)
        self.headers["name"] = _address(self.names) + np.arange(slots, dtype=np.uint64) * 16
        self.headers["namelen"] = SOCKADDR_SIZE
        self.headers["iov"] = _address(self.iov) + np.arange(slots, dtype=np.uint64) * 16
        self.headers["iovlen"] = 1

    def send(
        self, packets: np.ndarray, keys: np.ndarray, lengths: np.ndarray | None = None
    ) -> np.ndarray:
        """Send ``packets[i]`` (C-contiguous uint8 rows) to address key ``keys[i]``:
        the whole row, or its first ``lengths[i]`` bytes.

        Returns which went out. The kernel stops a batch at the first failure; the
        failed datagram is skipped and the rest sent, so one unreachable phone
        cannot silence the others.
        """
        count = len(keys)
        ok = np.ones(count, bool)
        if count == 0:
            return ok
        if count > self.slots:
            self._allocate(max(count, 2 * self.slots))
        size = packets.shape[1]
        self.names["port"][:count] = keys & 0xFFFF
        self.names["addr"][:count] = keys >> 16
        self.iov["base"][:count] = _address(packets) + np.arange(count, dtype=np.uint64) * size
        self.iov["len"][:count] = size if lengths is None else lengths
        base = _address(self.headers)
        start = 0
        began = time.thread_time()
        while start < count:
            n = self.lib.sendmmsg(
                self.fd, base + start * MMSGHDR.itemsize, count - start, MSG_DONTWAIT
            )
            if n < 0:  # the datagram at `start` failed (no buffer space, unreachable): skip it
                self.errors += 1
                ok[start] = False
                start += 1
                continue
            start += n
        self.syscall_seconds += time.thread_time() - began
        return ok
