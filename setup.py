"""The compiled parts: the sound card's stream callback (hardware/_callback.c), the
elastic FIFOs' audio path (hardware/_elastic.c: the variable-ratio resampler and its moves
between the card's rings and the tick), both using hardware/shared.h (the rings' two
ends and the callback's stamp), and the SIP leg bank's per-tick loops
(gateway/sip/_rtpbatch.c: the receive batch, the jitter buffers, the send batch, SRTP).

Everything else is in pyproject.toml; setuptools reads both.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.hardware._callback",
            ["hardware/_callback.c"],
            depends=["hardware/shared.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "gateway.hardware._elastic",
            ["hardware/_elastic.c"],
            depends=["hardware/shared.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "gateway.sip._rtpbatch",
            ["gateway/sip/_rtpbatch.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ],
)
