"""The refusal of a link command, shared by the links service that raises it and the
front ends that pass its text back (the CLI's control socket, the console, MQTT).

In a module of its own so that the control socket need not import the service it
drives (the service builds the socket).
"""


class LinkError(Exception):
    """A cut or restore that cannot be done; the message says why (sent back to the caller)."""
