"""``borderlink link cut|restore|status``: the CLI talks to the running gateway.

Over a unix socket next to the site config (``SITE.links.sock``, mode 0600): only
the gateway's own user (and root) can open it, so the file system is the
authentication, and the kernel tells us who is on the other end (``SO_PEERCRED``),
which is what the audit records as "who". One JSON request line, one JSON reply
line. The gateway listens only while ``[links]`` is configured.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.links.errors import LinkError

if TYPE_CHECKING:
    import asyncio  # imported where the server runs: 'borderlink link' and --help need none

    from gateway.links.service import LinksService

MAX_REQUEST = 4096


def control_path(config_source: Path | str | None) -> Path | None:
    if config_source is None:
        return None
    source = Path(config_source)
    return source.with_name(source.stem + ".links.sock")


def _who(writer: asyncio.StreamWriter) -> str:
    """The local user at the other end of the socket, by the kernel's word."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return f"local:{pwd.getpwuid(uid).pw_name}"
    except (OSError, KeyError, AttributeError):
        return "local:unknown"


class ControlServer:
    def __init__(self, path: Path, links: LinksService) -> None:
        self.path = path
        self.links = links
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        import asyncio

        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a gateway that died
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        import asyncio

        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 0.2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            reply = self.handle(line[:MAX_REQUEST], _who(writer))
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()

    def handle(self, line: bytes, who: str) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError:
            return {"ok": False, "error": "send one JSON object per line"}
        action = request.get("action")
        link, share = request.get("link"), request.get("share")
        reason = request.get("reason") or ""
        if share is not None and not isinstance(share, str) or not isinstance(reason, str):
            return {"ok": False, "error": "share and reason are strings"}
        try:
            if action == "status":
                return {"ok": True, "links": self.links.status()}
            if not isinstance(link, str):
                return {"ok": False, "error": "which link? give its name"}
            if action == "cut":
                return {"ok": True, **self.links.cut(link, share, who, reason, "cli")}
            if action == "restore":
                return {"ok": True, **self.links.restore(link, share, who, "cli")}
        except LinkError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": False, "error": "action is cut, restore or status"}


def request(config: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the gateway running ``config``; its reply."""
    path = control_path(config)
    assert path is not None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            return {
                "ok": False,
                "error": f"no gateway running {config} with [links] answers on {path} "
                f"({exc.strerror})",
            }
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        return json.loads(data)
    except ValueError:
        return {"ok": False, "error": "the gateway sent no answer"}


# --- the command line ----------------------------------------------------------------------


def link_arguments(parser: Any) -> None:
    parser.add_argument("action", choices=("cut", "restore", "status"))
    parser.add_argument("link", nargs="?", help="the link's name ([links.NAME])")
    parser.add_argument("--share", help="only this shared name on the link")
    parser.add_argument("--reason", default="", help="why (written to the audit log)")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=os.environ.get("BORDERLINK_CONFIG"),
        help="the running site's TOML file (default: $BORDERLINK_CONFIG)",
    )


def link(args: Any) -> int:
    if args.config is None:
        print("which gateway? give --config SITE.toml (or set BORDERLINK_CONFIG)")
        return 2
    if args.action != "status" and not args.link:
        print(f"link {args.action} needs the link's name")
        return 2
    message = {"action": args.action, "link": args.link, "share": args.share, "reason": args.reason}
    reply = request(args.config, message)
    if not reply.get("ok"):
        print(f"refused: {reply.get('error')}")
        return 1
    print(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=1))
    return 0
