"""The browser dispatcher console: operator login, WebRTC (Opus) talk and monitor,
who-is-talking over a WebSocket, served by the gateway's one web server.

The ``[console]`` section, the console routes (:func:`gateway.webrtc.server.install`)
and ``borderlink passwd`` are named in :mod:`gateway.endpoints`. aiortc and the
server are imported only when a site has a ``[console]`` section.
"""
