"""The compiled parts: the sound card's stream callback (hardware/_callback.c) and the
elastic FIFOs' audio path (hardware/_elastic.c: the variable-ratio resampler and its moves
between the card's rings and the tick). Both use the rings' two ends, hardware/ring.h.

Everything else is in pyproject.toml; setuptools reads both.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.hardware._callback",
            ["hardware/_callback.c"],
            depends=["hardware/ring.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "gateway.hardware._elastic",
            ["hardware/_elastic.c"],
            depends=["hardware/ring.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ],
)
