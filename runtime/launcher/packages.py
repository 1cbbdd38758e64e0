"""Finding installed ROS packages without ament_index_python: share dirs and install prefixes.

The launcher resolves `$(find-pkg-share PKG)` and node executables the way a colcon
install does (`<prefix>/share/PKG`, `<prefix>/lib/PKG/<exec>` for each prefix on
AMENT_PREFIX_PATH), and also looks in this interpreter's prefix, where `pip install`
puts data files. An editable install of helmstack installs no data files at all, so for
helmstack itself the source checkout (the directory holding its package.xml) is the
last resort.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HELMSTACK = "helmstack"
# runtime/launcher/packages.py -> the directory holding package.xml and runtime/.
SOURCE_CHECKOUT = Path(__file__).resolve().parents[2]


class PackageNotFoundError(LookupError):
    """No install prefix (and, for helmstack, no source checkout) provides the package."""


def ament_prefixes() -> list[Path]:
    """AMENT_PREFIX_PATH entries in order, then sys.prefix (once)."""
    prefixes = [Path(p) for p in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p]
    own = Path(sys.prefix)
    if own not in prefixes:
        prefixes.append(own)
    return prefixes


def find_package_share(package: str) -> Path:
    """Return the share directory of `package`, or raise PackageNotFoundError naming it."""
    prefixes = ament_prefixes()
    for prefix in prefixes:
        marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / package
        share = prefix / "share" / package
        if marker.is_file() or share.is_dir():
            return share
    if package == HELMSTACK and (SOURCE_CHECKOUT / "package.xml").is_file():
        return SOURCE_CHECKOUT
    searched = ", ".join(str(p) for p in prefixes)
    raise PackageNotFoundError(f"package '{package}' not found (searched share/{package} in: {searched})")
