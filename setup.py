"""The one compiled part: the sound card's stream callback (see hardware/_callback.c).

Everything else is in pyproject.toml; setuptools reads both.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gateway.hardware._callback",
            ["hardware/_callback.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        ),  # fmt: skip
    ],
)
