"""The card's folders must ship under one import root, in editable installs and wheels."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_editable_install_maps_sibling_folders_under_gateway() -> None:
    import gateway.codecs
    import gateway.hardware
    import gateway.monitoring

    assert Path(gateway.codecs.__file__).parent == REPO / "codecs"
    assert Path(gateway.hardware.__file__).parent == REPO / "hardware"
    assert Path(gateway.monitoring.__file__).parent == REPO / "monitoring"
    import codecs  # the standard library's, not ours

    assert hasattr(codecs, "lookup")


def test_wheel_contains_every_package_under_gateway(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("borderlink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in (
        "gateway/engine.py",
        "gateway/codecs/g711.py",
        "gateway/hardware/__init__.py",
        "gateway/monitoring/__init__.py",
    ):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith(("codecs/", "hardware/", "monitoring/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "borderlink = gateway.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
