"""BorderLink: a cross-border radio interoperability gateway."""

# The one place the version is written: pyproject.toml reads it from here, and
# ``borderlink --version`` does not pay for an installed-metadata lookup.
__version__ = "0.1.0"
