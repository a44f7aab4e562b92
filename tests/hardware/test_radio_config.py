"""Bad input to a radio port: clear errors that say what is wrong and how to fix it."""

from __future__ import annotations

import pytest
from gateway.hardware.devices import DeviceNotFound, find_card

from gateway.config import ConfigError, Timing, parse_config
from gateway.radio import SoundcardConfig, SoundcardPort
from tests.hardware.jackradio import site_toml

pytestmark = pytest.mark.jack

RADIO = 'kind = "soundcard"\ndevice = "system"\nhost_api = "JACK"\n'


def problems(body: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(site_toml({"r": body}), "site.toml")
    return str(info.value)


def test_tx_delay_longer_than_tx_tot_is_a_config_error():
    text = problems(RADIO + 'tx_delay = "1s"\ntx_tot = "500ms"')
    assert "tx_delay must be shorter than tx_tot" in text


def test_open_delay_and_anti_kerchunk_together_are_refused():
    both = 'anti_kerchunk = "100ms"\nsquelch = { type = "vox", open_delay = "40ms" }'
    text = problems(RADIO + both)
    assert "not both" in text


def test_squelch_type_names_what_it_needs():
    assert "squelch type 'serial' needs device" in problems(RADIO + 'squelch = { type = "serial" }')
    wrong_line = 'squelch = { type = "serial", device = "/dev/x", line = "rts" }'
    assert "line" in problems(RADIO + wrong_line)


def test_unknown_ptt_type_lists_the_kinds():
    text = problems(RADIO + 'ptt = { type = "parallel" }')
    assert "ptt" in text and "serial" in text and "cm108" in text


def test_unknown_device_lists_the_cards_that_exist(jack_server):
    with pytest.raises(DeviceNotFound) as info:
        find_card("Nonexistent USB fob")
    message = str(info.value)
    assert "no sound card named like 'Nonexistent USB fob'" in message
    assert "system" in message and "JACK" in message  # the card that does exist


def test_unknown_device_names_the_cards_and_the_port_stays_down(jack_server):
    """The card's own process looks the name up (with the server's device list) and the
    reason reaches the port's open; the port is down, counted, and retried."""
    config = parse_config(site_toml({"r": RADIO.replace('"system"', '"Nonexistent"')}))
    port = SoundcardPort("r", config.ports["r"], Timing())
    try:
        with pytest.raises(DeviceNotFound, match="the cards are") as info:
            port.open()
        assert "system" in str(info.value) and "JACK" in str(info.value)
        assert not port.card.up and port.stats()["device_errors"] >= 1
    finally:
        port.close()


def test_a_rate_the_card_cannot_run_at_is_explained(jack_server):
    config = parse_config(site_toml({"r": RADIO + "sample_rate = 44100"}))
    port_config = config.ports["r"]
    assert isinstance(port_config, SoundcardConfig)
    port = SoundcardPort("r", port_config, Timing())
    try:
        with pytest.raises(OSError, match="44100 Hz is not a rate this device runs at"):
            port.open()
        assert not port.card.up and port.stats()["device_errors"] >= 1
    finally:
        port.close()
