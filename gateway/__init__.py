"""BorderLink: a cross-border radio interoperability gateway."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("borderlink")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
