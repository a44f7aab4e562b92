"""Fixtures of the SIP suite: a kamailio registrar and baresip phones, stopped by PID."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sip_peers import Kamailio, Phone


@pytest.fixture
def kamailio(tmp_path: Path):
    registrar = Kamailio(tmp_path)
    registrar.start()
    yield registrar
    registrar.stop()


@pytest.fixture
def phones(tmp_path: Path):
    made: list[Phone] = []

    def make(
        name: str,
        source: np.ndarray,
        codec: str = "PCMU",
        registrar_port: int | None = None,
        rtcp_mux: bool = False,
        password: str = "",
        registrar_host: str = "127.0.0.1",
        **stream: object,  # transport, cafile, certificate: SIP over TCP/TLS
    ) -> Phone:
        phone = Phone(
            tmp_path,
            name,
            source,
            codec,
            registrar_port,
            rtcp_mux,
            password,
            registrar_host,
            **stream,
        )
        made.append(phone)
        return phone

    yield make
    for phone in made:
        phone.stop()
