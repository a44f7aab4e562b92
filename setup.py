"""The compiled parts: the sound card's stream callback (see hardware/_callback.c) and the
variable-ratio resampler's inner loop (codecs/_sinc.c).

Everything else is in pyproject.toml; setuptools reads both.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.hardware._callback",
            ["hardware/_callback.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
        Extension(
            "gateway.codecs._sinc",
            ["codecs/_sinc.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),
    ],
)
