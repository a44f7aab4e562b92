"""A test-only 'parrot' radio: it says back, one tick later, whatever it hears.

Radio techs use a parrot (a store-and-forward repeater) to hear their own
transmit path; here it lets a phone hear itself through the gateway so the
round trip can be measured by correlation.
"""

from __future__ import annotations

import numpy as np

from gateway.config import PortConfig
from gateway.endpoints import ENDPOINTS, Endpoint
from gateway.ports import Frame, Port


class ParrotConfig(PortConfig):
    pass


class Parrot(Port):
    def __init__(self, name: str, config: ParrotConfig, timing) -> None:  # noqa: ANN001
        super().__init__(name, config, timing)
        self.held: np.ndarray | None = None

    def read(self) -> Frame | None:
        frame, self.held = self.held, None
        self.talking = frame is not None
        return frame

    def write(self, frame: Frame | None) -> None:
        self.held = None if frame is None else frame.copy()


ENDPOINTS_WITH_PARROT = (
    *ENDPOINTS,
    Endpoint("parrot", ports={"test_parrot": (ParrotConfig, Parrot)}),
)
