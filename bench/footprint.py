"""Memory and idle CPU of a site's processes: the gateway and each card process.

    .venv/bin/python bench/footprint.py              # demo site, 4-radio JACK site, --version
    .venv/bin/python bench/footprint.py --idle 30    # a longer CPU window
    .venv/bin/python bench/footprint.py --radios 2   # a smaller JACK site
    .venv/bin/python bench/footprint.py --skip-demo --frame 10ms   # the JACK site's CPU at 10 ms
    .venv/bin/python bench/footprint.py --server mine   # the JACK site on jackd -n mine

Each site runs as ``borderlink`` in a process of its own: the demo site (simulated
radios, no card) and a site of ``--radios`` sound-card radios on a JACK dummy server of
this bench's own (48 kHz, 256 frames). Once the site has settled (every card's JACK
client is on the server), this reads for the gateway and each of its children — the
card processes, and the spare card process waiting for the next card — RSS and
``VmLck`` (``/proc/PID/status``), PSS (``smaps_rollup``: shared pages split between the
processes sharing them, so the PSS column adds up) and CPU over ``--idle`` seconds
(``utime + stime`` from ``/proc/PID/stat``, in % of one core).

Goals (issue #18): a card process ≤ 30 MB RSS and ≤ 10 MB locked; the gateway and
four radios ≤ 250 MB RSS together; ``borderlink --version`` ≤ 0.2 s. The machine is
shared: CPU figures are noisy, memory figures are not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.hardware.jackradio import site_toml, start_jackd, stop_jackd  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

BORDERLINK = Path(sys.executable).with_name("borderlink")
TICKS = os.sysconf("SC_CLK_TCK")
RADIO = """
kind = "soundcard"
device = "system"
host_api = "JACK"
squelch = { type = "vox", threshold_dbfs = -45, hang = "200ms" }
"""


@dataclass
class Sample:
    pid: int
    role: str
    rss_kb: int
    pss_kb: int
    locked_kb: int  # VmLck: the size of every locked mapping
    jack_rss_kb: int  # of those, the JACK server's shared segments (/dev/shm/jack*)
    jack_locked_kb: int
    cpu_ticks: int


def memory(pid: int) -> tuple[int, int, int, int, int]:
    """RSS, PSS, locked, and the RSS and locked size of the JACK server's segments (kB).

    libjack maps the server's shared segment (its size is the server's ``--port-max``'s:
    about 100 MB by default) into every client and locks it, so every JACK client's RSS
    and VmLck carry it, while the box holds it once (PSS splits it between them).
    """
    rss = pss = locked = jack_rss = jack_locked = 0
    path, size, resident = "", 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, value = line.partition(":")
        if not line.split(maxsplit=1)[0].endswith(":"):  # a mapping's first line
            fields = line.split(maxsplit=5)
            path = fields[5] if len(fields) > 5 else ""
        elif key == "Size":
            size = int(value.split()[0])
        elif key == "Rss":
            resident = int(value.split()[0])
            rss += resident
            jack_rss += resident if path.startswith("/dev/shm/jack") else 0
        elif key == "Pss":
            pss += int(value.split()[0])
        elif key == "VmFlags" and "lo" in value.split():
            locked += size
            jack_locked += size if path.startswith("/dev/shm/jack") else 0
    return rss, pss, locked, jack_rss, jack_locked


def _cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def descendants(pid: int) -> list[int]:
    """The process's children, theirs, and so on (the demo's gateways have their own)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found += [int(child), *descendants(int(child))]
    return found


def role(pid: int) -> str:
    """What a child of the gateway is, from its command line (and, for a card, its maps)."""
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    if "card_main" in command or "card_process" in command:
        loaded = "libportaudio" in Path(f"/proc/{pid}/maps").read_text()
        return "card" if loaded else "spare card"  # the spare loads PortAudio when asked
    if "guardian" in command:
        return "ptt guardian"
    if "gateway.cli" in command:
        return "demo site"  # one of the demo's two gateways (the first row: the demo)
    if "resource_tracker" in command:
        return "shm tracker"  # multiprocessing's, for the gateway's SharedMemory blocks
    return "other"


def sample(gateway: int) -> list[Sample]:
    pids = [(gateway, "gateway")] + [(c, role(c)) for c in descendants(gateway)]
    return [Sample(pid, name, *memory(pid), _cpu_ticks(pid)) for pid, name in pids]


def measure(gateway: subprocess.Popen, idle: float) -> list[tuple[Sample, float]]:
    """Each process's memory at the end of an ``idle``-second window, and its CPU in it (%)."""
    first = {s.pid: s.cpu_ticks for s in sample(gateway.pid)}
    start = time.monotonic()
    time.sleep(idle)
    last = sample(gateway.pid)
    elapsed = time.monotonic() - start
    return [
        (s, 100 * (s.cpu_ticks - first.get(s.pid, s.cpu_ticks)) / TICKS / elapsed) for s in last
    ]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo_site(idle: float, settle: float) -> list[tuple[Sample, float]]:
    gateway = subprocess.Popen(
        [str(BORDERLINK), "demo", "--plain"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(settle)
        if gateway.poll() is not None:
            raise RuntimeError("the demo site stopped by itself")
        return measure(gateway, idle)
    finally:
        stop(gateway)


def jack_site(
    radios: int,
    idle: float,
    settle: float,
    tmp: Path,
    frame: str | None = None,
    server: str = f"footprint{os.getpid()}",
) -> list[tuple[Sample, float]]:
    jackd = start_jackd(server)
    env = {**os.environ, "JACK_DEFAULT_SERVER": server}
    names = [f"radio_{i + 1}" for i in range(radios)]
    config = tmp / "site.toml"
    timing = f'[timing]\nframe = "{frame}"\n' if frame else ""
    config.write_text(site_toml(dict.fromkeys(names, RADIO), extra=timing))
    log = (tmp / "gateway.log").open("w")
    gateway = subprocess.Popen(
        [str(BORDERLINK), "run", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env
    )
    try:

        def all_cards_on_the_server() -> bool:
            if gateway.poll() is not None:
                raise RuntimeError(f"the gateway stopped: see {tmp / 'gateway.log'}")
            ports = subprocess.run(["jack_lsp"], env=env, capture_output=True, text=True).stdout
            return all(f"borderlink-{name}:in_0" in ports for name in names)

        wait_for(
            all_cards_on_the_server, 60, f"{radios} cards on JACK server {server}", interval=0.2
        )
        time.sleep(settle)
        return measure(gateway, idle)
    finally:
        stop(gateway)
        log.close()
        stop_jackd(jackd)


def version_time(runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([str(BORDERLINK), "--version"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(title: str, rows: list[tuple[Sample, float]]) -> str:
    mb = 1024
    head = ("process", "pid", "RSS", "PSS", "locked", "RSS-JACK", "locked-JACK", "CPU %")
    lines = [title, "  {:<13}{:>7}{:>8}{:>8}{:>8}{:>10}{:>13}{:>7}".format(*head)]
    form = "  {:<13}{:>7}{:>8.1f}{:>8.1f}{:>8.1f}{:>10.1f}{:>13.1f}{:>7.2f}"
    for s, cpu in rows:
        lines.append(
            form.format(
                s.role,
                s.pid,
                s.rss_kb / mb,
                s.pss_kb / mb,
                s.locked_kb / mb,
                (s.rss_kb - s.jack_rss_kb) / mb,
                (s.locked_kb - s.jack_locked_kb) / mb,
                cpu,
            )
        )
    samples = [s for s, _ in rows]
    lines.append(
        form.format(
            "total",
            "",
            sum(s.rss_kb for s in samples) / mb,
            sum(s.pss_kb for s in samples) / mb,
            sum(s.locked_kb for s in samples) / mb,
            sum(s.rss_kb - s.jack_rss_kb for s in samples) / mb,
            sum(s.locked_kb - s.jack_locked_kb for s in samples) / mb,
            sum(cpu for _, cpu in rows),
        )
    )
    lines.append("  (MB; RSS-JACK, locked-JACK: without the JACK server's shared segments)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=float, default=10.0, help="CPU window, seconds")
    parser.add_argument("--settle", type=float, default=15.0, help="wait before measuring")
    parser.add_argument("--radios", type=int, default=4, help="sound cards on the JACK site")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-jack", action="store_true")
    parser.add_argument("--frame", help="the JACK site's engine frame (default: the site default)")
    parser.add_argument("--server", default=f"footprint{os.getpid()}", help="jackd -n NAME")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    print(f"borderlink --version: {version_time() * 1000:.0f} ms (median of 5)")
    if not args.skip_demo:
        print(table("demo site (simulated radios)", demo_site(args.idle, args.settle)))
    if not args.skip_jack:
        with tempfile.TemporaryDirectory(prefix="footprint") as tmp:
            rows = jack_site(
                args.radios, args.idle, args.settle, Path(tmp), args.frame, args.server
            )
        frame = f", {args.frame} frames" if args.frame else ""
        print(table(f"{args.radios}-radio JACK site (dummy, 48 kHz, 256 frames{frame})", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
