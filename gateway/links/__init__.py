"""Cross-border links: two sovereign gateways share talkgroups over an encrypted trunk.

Shares (mutual consent per shared name), who is talking across the border (talker
IDs in an RTP header extension), one floor on both sides, and the sovereign cut.
Importing this package registers the ``[links]`` section (``borderlink check``),
its service (the trunk, after the SIP service it runs on) and ``borderlink link``.
"""

from gateway.links import config as config  # noqa: F401  ([links] section)
from gateway.links import service as service  # noqa: F401  (the trunk; imports [sip] first)
