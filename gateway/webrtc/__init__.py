"""The browser dispatcher console: operator login, WebRTC (Opus) talk and monitor,
who-is-talking over a WebSocket, served by the gateway's one web server.

Importing the package registers the ``[console]`` section, the console routes
and the ``borderlink passwd`` command.
"""

from gateway.webrtc import config, passwords, server  # noqa: F401
