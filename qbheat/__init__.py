"""qbheat: pre-train lightweight vision backbones with QB-Heat, probe them, and hand them to export.

Importing the package first installs the torchvision compatibility shim (see ``qbheat._compat``),
because timm imports torchvision and the torchvision wheel that matches CPU torch 2.13 cannot be
imported on its own.
"""
from qbheat import _compat  # noqa: F401  (must run before any timm / torchvision import)
from qbheat.errors import QBHeatError

__version__ = "0.1.0"
__all__ = ["QBHeatError", "__version__"]
