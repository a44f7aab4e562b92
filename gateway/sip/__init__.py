"""SIP: phones and PBXs join talkgroups.

Signalling goes through pyVoIP's parser and REGISTER/digest builders
(:mod:`.pyvoip`, the one seam) over the gateway's own transports: UDP
(:mod:`.transport`), TCP and TLS (:mod:`.stream`, certificates and trust in
:mod:`.tls`); calls (:mod:`.calls`) become ports (:mod:`.leg`) whose
media — RTP (:mod:`.rtp`), jitter buffers (:mod:`.jitter`), G.711 and
resampling — is handled for all legs at once by the leg bank (:mod:`.bank`) on
the engine's clock; a link's Opus (:mod:`.opus`) is coded per leg at the bank's
edges (:mod:`.bank_opus`). The ``[sip]`` section and the service are named in
:mod:`gateway.endpoints`.
"""
