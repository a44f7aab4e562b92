"""What a card process costs against a bare native JACK client on the same server.

    .venv/bin/python bench/jack_wakeup.py                  # 3 rounds of 20 s, alternating
    .venv/bin/python bench/jack_wakeup.py --server mine    # jackd -n mine

A card process (PortAudio's JACK client around our C callback) is woken by the JACK
server every period, 187 times a second at 48 kHz and 256 frames. Is its CPU PortAudio's
or the wake-up's? This builds a bare native client (the C below: its input copied to
its output each period, linked to libjack without its headers) and measures, on one
dummy server of its own, each round: nothing, the bare client, a card process — CPU
over ``--seconds`` from ``/proc/PID/task/*/schedstat`` (nanoseconds: ``/proc/PID/stat``
samples at the kernel's tick, too coarse for a process that runs a few µs at a time),
and the server's own beside it. Needs gcc and libjack (``libjack-jackd2-0``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hardware.jackradio import start_jackd, stop_jackd  # noqa: E402

BARE_C = r"""
#include <signal.h>
#include <string.h>
#include <unistd.h>
typedef struct _jack_client jack_client_t;
typedef struct _jack_port jack_port_t;
typedef unsigned int jack_nframes_t;
extern jack_client_t *jack_client_open(const char *, int, int *, ...);
extern jack_port_t *jack_port_register(jack_client_t *, const char *, const char *,
                                       unsigned long, unsigned long);
extern int jack_set_process_callback(jack_client_t *, int (*)(jack_nframes_t, void *), void *);
extern int jack_activate(jack_client_t *);
extern void *jack_port_get_buffer(jack_port_t *, jack_nframes_t);
extern int jack_connect(jack_client_t *, const char *, const char *);
extern const char *jack_port_name(const jack_port_t *);
static jack_port_t *in, *out;
static int process(jack_nframes_t n, void *arg)
{
    (void)arg;
    memcpy(jack_port_get_buffer(out, n), jack_port_get_buffer(in, n), n * sizeof(float));
    return 0;
}
int main(int argc, char **argv)
{
    jack_client_t *c = jack_client_open(argc > 1 ? argv[1] : "bare", 0, NULL);
    if (!c)
        return 1;
    in = jack_port_register(c, "in_0", "32 bit float mono audio", 1, 0);
    out = jack_port_register(c, "out_0", "32 bit float mono audio", 2, 0);
    jack_set_process_callback(c, process, NULL);
    if (jack_activate(c))
        return 1;
    jack_connect(c, "system:capture_1", jack_port_name(in));
    jack_connect(c, jack_port_name(out), "system:playback_1");
    for (;;)
        pause(); /* until SIGTERM */
}
"""


def cpu_seconds(pid: int) -> float:
    """CPU so far of every thread of ``pid`` (schedstat: nanoseconds on a CPU)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # (a thread that ended meanwhile)
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def build_bare(folder: Path) -> Path:
    source, binary = folder / "bare.c", folder / "bare"
    source.write_text(BARE_C)
    libjack = "/usr/lib/x86_64-linux-gnu/libjack.so.0"
    if not Path(libjack).exists():
        libjack = "-l:libjack.so.0"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(source), libjack], check=True)
    return binary


def start(kind: str, bare: Path, name: str):  # noqa: ANN201 - (pid, stop) of what runs
    """Start one client of ``kind``; returns its pid and how to stop it."""
    if kind == "nothing":
        return None, lambda: None
    if kind == "bare C client":
        proc = subprocess.Popen([str(bare), name])
        return proc.pid, lambda: (proc.terminate(), proc.wait(5))
    from gateway.hardware.card_process import CardBlock, CardProcess, OpenRequest

    block = CardBlock()
    card = CardProcess(block)
    card.start(OpenRequest("system", "JACK", 1, 1, 0, 0, None, 0, "low", name))
    assert card.process is not None
    return card.process.pid, lambda: (card.stop(), block.close())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", default=f"wakeup{os.getpid()}", help="jackd -n NAME")
    args = parser.parse_args()
    kinds = ("nothing", "bare C client", "card process")
    client: dict[str, list[float]] = {k: [] for k in kinds}
    server: dict[str, list[float]] = {k: [] for k in kinds}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        bare = build_bare(Path(tmp))
        jackd = start_jackd(args.server)
        os.environ["JACK_DEFAULT_SERVER"] = args.server
        try:
            for round_ in range(args.rounds):
                for kind in kinds:
                    pid, stop = start(kind, bare, f"wakeup{round_}")
                    time.sleep(3.0)  # connected and running
                    a = cpu_seconds(pid) if pid else 0.0
                    j, t = cpu_seconds(jackd.pid), time.monotonic()
                    time.sleep(args.seconds)
                    b = cpu_seconds(pid) if pid else 0.0
                    k, t = cpu_seconds(jackd.pid), time.monotonic() - t
                    stop()
                    client[kind].append((b - a) / t * 100)
                    server[kind].append((k - j) / t * 100)
        finally:
            stop_jackd(jackd)
    print(
        f"\nJACK dummy server, 48 kHz, 256 frames; {args.rounds} rounds of {args.seconds:g} s, "
        f"alternating; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(f"{'client':<14} {'client CPU % (median, runs)':<34} {'jackd CPU % (median)':>20}")
    for kind in kinds:
        runs = ", ".join(f"{v:.2f}" for v in client[kind])
        print(
            f"{kind:<14} {statistics.median(client[kind]):>5.2f} ({runs}){'':<8}"
            f"{statistics.median(server[kind]):>12.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
