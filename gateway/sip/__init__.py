"""SIP: phones and PBXs join talkgroups.

Each message is read once into a :class:`~.message.SipMessage` (:mod:`.message`);
pyVoIP builds the REGISTER and its digest (:mod:`.pyvoip`, its one seam). Both go
over the gateway's own transports: UDP
(:mod:`.transport`), TCP and TLS (:mod:`.stream`, certificates and trust in
:mod:`.tls`); calls (:mod:`.calls`) become ports (:mod:`.leg`) whose
media — RTP (:mod:`.rtp`), jitter buffers (:mod:`.jitter`), G.711 and
resampling — is handled for all legs at once by the leg bank (:mod:`.bank`) on
the engine's clock; a link's Opus (:mod:`.opus`) is coded per leg at the bank's
edges (:mod:`.bank_opus`). The ``[sip]`` section and the service are named in
:mod:`gateway.endpoints`.
"""
