"""Cross-border links: two sovereign gateways share talkgroups over an encrypted trunk.

Shares (mutual consent per shared name), who is talking across the border (talker
IDs in an RTP header extension), one floor on both sides, and the sovereign cut.
The ``[links]`` section, its service (the trunk, after the SIP service it runs on)
and ``borderlink link`` are named in :mod:`gateway.endpoints`.
"""
