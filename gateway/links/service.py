"""The ``[links]`` service: a trunk per configured link, on the site's SIP stack.

It runs on ``[sip]``: the trunks' dialogs are ordinary SIP dialogs of the
:class:`~gateway.sip.calls.CallManager`, over the TLS listener ``[sip]
listen_tls`` (whose certificate is what the peer verifies when it dials us), and
their legs are rows of the same leg bank. What the service adds:

* the trust: each link's peer address is verified by the link's own rules (its
  ``peer_ca`` and ``peer_name``, or ``peer_fingerprints``), with the link's
  certificate as our client certificate; callers' certificates from the links'
  CAs are accepted on the TLS listener;
* the hook: a new INVITE from a TLS peer that one of the links recognises goes to
  that link (:meth:`Trunk.on_invite`) before any route sees it;
* cuts and restores (:meth:`cut`, :meth:`restore`) from the CLI's control socket
  (:mod:`gateway.links.control`) and MQTT, audited and remembered
  (:mod:`gateway.links.cuts`);
* a live reload (:meth:`reconfigure`): shares and links change without a restart;
* the engine's shared floors and talker announcements (:mod:`gateway.links.arbiter`);
* metrics (:meth:`stats`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.links.arbiter import Arbiter
from gateway.links.config import LinkConfig, LinksConfig, site_id
from gateway.links.control import ControlServer, control_path
from gateway.links.cuts import CutStore, state_path
from gateway.links.errors import LinkError
from gateway.links.talker import REASONS, Talker
from gateway.links.trunk import STATES, Trunk
from gateway.sip.config import split_hostport
from gateway.sip.message import SipMessage
from gateway.sip.stream import PeerTls
from gateway.sip.tls import client_context

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)


class LinksService:
    def __init__(self, gateway: Gateway, config: LinksConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.trunks: dict[str, Trunk] = {}
        source = gateway.config.source
        self.cuts = CutStore(state_path(Path(source) if source else None))
        self.control: ControlServer | None = None
        self._byes: set = set()
        self._addresses: set[tuple[str, int]] = set()  # the peers' addresses we dial
        self.arbiter: Arbiter | None = None

    async def start(self) -> None:
        sip = self.gateway.sip
        if sip is None or sip.calls is None or not sip.config.listen_tls:
            raise ValueError(
                "[links] runs over SIP TLS: add [sip] with listen_tls, tls_certificate and "
                "tls_key (the peer verifies that certificate when it dials this side)"
            )
        me = site_id(self.gateway.config)
        streams = sip.transport.streams
        for name, link in self.config.links.items():
            if link.enabled:
                self.trunks[name] = self._trunk_for(name, link)
        self._trust()
        self.arbiter = Arbiter(
            me, self.gateway.config.site.name, frozenset(self.config.relay), self._audit
        )
        self.gateway.engine.shared_floors = self.arbiter
        sip.calls.links = self._on_invite
        path = control_path(self.gateway.config.source)
        if path is not None:
            self.control = ControlServer(path, self)
            await self.control.start()
        for trunk in self.trunks.values():
            trunk.start()
        host, port = split_hostport(sip.config.listen_tls)
        log.info(
            "links: %s as site %s over TLS %s:%s",
            ", ".join(self.trunks) or "none",
            me,
            host,
            streams.ports.get("tls", port),
        )

    async def stop(self) -> None:
        sip = self.gateway.sip
        if sip is not None and sip.calls is not None and sip.calls.links == self._on_invite:
            sip.calls.links = None
        if self.control is not None:
            await self.control.stop()
        for trunk in self.trunks.values():
            await trunk.stop()
        self.gateway.engine.shared_floors = None

    def refuse_reload(self, new) -> str:  # noqa: ANN001 - a SiteConfig
        """Only this site's ID needs a restart (the peers' glare and floor rules use it)."""
        if site_id(new) != site_id(self.gateway.config):
            return "[links] site_id changed (the peers know us by it)"
        return ""

    def reconfigure(self, new) -> None:  # noqa: ANN001 - a SiteConfig
        """Make the links match a reloaded config, between two ticks, without waiting.

        A link removed (or ``enabled = false``) ends its dialogs now; a link whose
        address, identity or trust changed is rebuilt (its dialogs end and are redialled
        under the new terms); a link whose shares alone changed keeps the dialogs of the
        names that did not (:meth:`Trunk.reshare`). Cuts are not config and stay.
        """
        config = new.section("links") or LinksConfig()
        wanted = {name: link for name, link in config.links.items() if link.enabled}
        for name in [n for n in self.trunks if n not in wanted]:
            for bye in self.trunks.pop(name).retire():
                self._send(bye)
            log.warning("link %s removed by a reload: its dialogs ended", name)
        for name, link in wanted.items():
            trunk = self.trunks.get(name)
            if trunk is not None and trunk.config == link:
                continue
            if trunk is not None and _same_peer(trunk.config, link):
                for bye in trunk.reshare(link):
                    self._send(bye)
                log.info("link %s: shares reloaded", name)
                continue
            if trunk is not None:
                for bye in trunk.retire():
                    self._send(bye)
            self.trunks[name] = self._trunk_for(name, link)
            self.trunks[name].start()
            log.info("link %s %s by a reload", name, "rebuilt" if trunk else "added")
        self.config = config
        if self.arbiter is not None:
            self.arbiter.set_relay(frozenset(config.relay))
        self._trust()

    def _trunk_for(self, name: str, link: LinkConfig) -> Trunk:
        sip = self.gateway.sip
        return Trunk(
            name,
            link,
            site_id(self.gateway.config),
            sip.calls,
            self.gateway.engine,
            self._audit,
            lambda name=name: self.cuts.of(name),
        )

    def _trust(self) -> None:
        """TLS for every link: our client certificate and the peer's checks per address,
        and the peers' CAs on the listener for callers."""
        streams = self.gateway.sip.transport.streams
        for address in self._addresses:
            streams.peer_tls.pop(address, None)
        self._addresses = set()
        cas: list[Path] = []
        for trunk in self.trunks.values():
            link = trunk.config
            pins = frozenset(f"sha256:{p}" for p in link.peer_fingerprints)
            context = client_context(link.certificate, link.key, link.peer_ca, link.peer_ca is None)
            for address in link.addresses:
                streams.peer_tls[address] = PeerTls(context, link.expected_peer_name, pins)
                self._addresses.add(address)
            if link.peer_ca is not None:
                cas.append(link.peer_ca)
        streams.trust_callers(tuple(dict.fromkeys(cas)))

    def _on_invite(self, message: SipMessage) -> bool:
        for trunk in self.trunks.values():
            if trunk.recognises(message.source):
                trunk.on_invite(message)
                return True
        return False

    def _audit(self, event: str, **fields: object) -> None:
        audit = getattr(self.gateway, "audit", None)
        if audit is not None and hasattr(audit, "record"):
            audit.record(event, **fields)

    # --- the sovereign cut -----------------------------------------------------------------

    def _trunk(self, link: str, share: str | None) -> Trunk:
        trunk = self.trunks.get(link)
        if trunk is None:
            raise LinkError(f"no link named {link!r}; configured: {', '.join(self.trunks)}")
        if share is not None and share not in trunk.names:
            raise LinkError(
                f"link {link!r} shares no name {share!r}; shared: {', '.join(trunk.names)}"
            )
        return trunk

    def cut(self, link: str, share: str | None, who: str, reason: str, via: str) -> dict[str, Any]:
        """Cut a link (or one shared name on it) now: audio stops before the next tick."""
        trunk = self._trunk(link, share)
        cut = self.cuts.cut(link, share, who, reason)
        for bye in trunk.cut(None if share is None else frozenset([share])):
            self._send(bye)
        self._audit("link_cut", link=link, share=share, who=cut.who, via=via, reason=cut.reason)
        log.warning(
            "link %s%s cut by %s via %s: %s",
            link,
            f" ({share})" if share else "",
            cut.who,
            via,
            cut.reason or "no reason given",
        )
        return {"link": link, "share": share, "state": trunk.state()}

    def restore(self, link: str, share: str | None, who: str, via: str) -> dict[str, Any]:
        trunk = self._trunk(link, share)
        if not self.cuts.restore(link, share):
            raise LinkError(f"link {link!r}{f' ({share})' if share else ''} is not cut here")
        trunk.changed()
        self._audit("link_restore", link=link, share=share, who=who[:64], via=via)
        log.warning(
            "link %s%s restored by %s via %s", link, f" ({share})" if share else "", who, via
        )
        return {"link": link, "share": share, "state": trunk.state()}

    def _send(self, bye) -> None:  # noqa: ANN001 - a coroutine
        import asyncio

        task = asyncio.ensure_future(bye)
        self._byes.add(task)
        task.add_done_callback(self._byes.discard)

    def status(self) -> dict[str, Any]:
        return {
            name: {
                "state": trunk.state(),
                "shares": {n: st.state for n, st in trunk.names.items()},
                "cut": {n: vars(c) for n, c in self.cuts.cuts.get(name, {}).items()},
            }
            for name, trunk in self.trunks.items()
        }

    # --- metrics -----------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        arbiter = self.arbiter or Arbiter("", "")
        state: dict[tuple[str, str], float] = {}
        shares: dict[tuple[str, str, str], float] = {}
        rtt: dict[str, float] = {}
        up: dict[str, float] = {}
        rejected: dict[tuple[str, str], float] = {}
        talking: dict[tuple[str, str], float] = {}
        emergency: dict[tuple[str, str], float] = {}
        for name, trunk in self.trunks.items():
            for reason in REASONS:
                rejected[(name, reason)] = float(trunk.talker_rejected[reason])
            for shared, st in trunk.names.items():
                heard = _heard(st)
                talking[(name, shared)] = float(heard is not None and heard.keyed)
                emergency[(name, shared)] = float(heard is not None and heard.emergency)
            now = trunk.state()
            for s in STATES:
                state[(name, s)] = float(now == s)
            for shared, st in trunk.names.items():
                for s in STATES:
                    shares[(name, shared, s)] = float(st.state == s)
            measured = trunk.rtt()
            if measured is not None:
                rtt[name] = measured
            up[name] = trunk.up_seconds()
        return {
            "link_state": state,
            "link_share_state": shares,
            "link_rtt_seconds": rtt,
            "link_up_seconds": up,
            "link_invites_refused": {n: float(t.refused_invites) for n, t in self.trunks.items()},
            "link_keepalive_timeouts": {
                n: float(t.keepalive_timeouts) for n, t in self.trunks.items()
            },
            "link_talker_rejected": rejected,
            "link_peer_talking": talking,
            "link_peer_emergency": emergency,
            "link_relaying": {g: float(not why) for g, why in arbiter.relaying.items()},
            "link_relay_held_back": {g: float(n) for g, n in arbiter.held_back_total.items()},
        }


def _same_peer(old: LinkConfig, new: LinkConfig) -> bool:
    """Whether two versions of a link differ at most in what they share (and describe)."""
    keep = {"share", "description"}
    return old.model_dump(exclude=keep) == new.model_dump(exclude=keep)


def _heard(st) -> Talker | None:  # noqa: ANN001 - a NameState
    """What the peer last said of its talker on this shared name's dialog (None: nothing)."""
    onair = getattr(st.dialog.leg, "onair", None) if st.dialog is not None else None
    if onair is None or onair.heard is None or not onair.heard.keyed:
        return None
    return onair.heard
