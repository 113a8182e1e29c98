"""Make ``import timm`` / ``import torchvision`` work in this environment, whatever is imported first.

The torchvision wheel that pins torch 2.13 is a CUDA build; next to CPU torch its import dies unless
two op schemas are defined first (``qbheat/_compat.py`` explains why and defines them). ``import
qbheat`` does that, but a script that imports timm first would fail. So ``scripts/setup.sh`` installs
this file into the virtual environment's site-packages as ``qbheat_torchvision_hook.py``, with a
one-line ``qbheat_torchvision_hook.pth`` that imports it at interpreter start-up:

    python scripts/torchvision_hook.py --install     # what setup.sh runs, with the venv's python

At start-up it only puts a finder on ``sys.meta_path`` (no torch import, nothing slow). The first time
anything imports ``torchvision``, the finder removes itself and imports ``qbheat._compat`` (which
defines the schemas only where they are missing), then lets the normal import go on. Without qbheat
importable it does nothing.
"""
from __future__ import annotations

import importlib.abc
import sys

NAME = "qbheat_torchvision_hook"


class ShimBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs qbheat's torchvision shim just before torchvision itself is first imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            import qbheat._compat  # noqa: F401  (defines torchvision::nms / qnms where they are missing)
        except ImportError:
            pass
        return None  # the ordinary finders import torchvision itself


def install_finder() -> None:
    if not any(isinstance(f, ShimBeforeTorchvision) for f in sys.meta_path) and "torchvision" not in sys.modules:
        sys.meta_path.insert(0, ShimBeforeTorchvision())


def install_into_site_packages() -> str:
    """Copy this file and its .pth into the running interpreter's site-packages; return the folder."""
    import shutil
    import sysconfig
    from pathlib import Path

    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copyfile(__file__, site / f"{NAME}.py")
    (site / f"{NAME}.pth").write_text(f"import {NAME}; {NAME}.install_finder()\n")
    return str(site)


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit(f"usage: {sys.argv[0]} --install   (installs the start-up hook into this Python's site-packages)")
    print(f"torchvision start-up hook installed in {install_into_site_packages()}")
