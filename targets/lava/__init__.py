"""Lava backend: lowers the fixed-point network to Lava processes run with `Loihi2SimCfg(select_tag='fixed_pt')`.

Importing this package fails with a one-line ToolchainError when Lava cannot be used here.
"""

from __future__ import annotations

import sys

from toolchain.errors import ToolchainError

LAVA_HINT = "install it with `pip install lava-nc==0.10.0` on Python 3.10 with numpy<2"

if sys.version_info[:2] != (3, 10):
    raise ToolchainError(
        f"the lava target needs Python 3.10 (lava-nc 0.10.0 installs only there), this is "
        f"{sys.version_info.major}.{sys.version_info.minor}; {LAVA_HINT}"
    )
try:
    import lava.magma.core.process.process  # noqa: F401
except Exception as exc:  # ImportError, or a broken install (e.g. numpy 2)
    raise ToolchainError(f"the lava target needs lava-nc, which cannot be imported ({exc}); {LAVA_HINT}") from None
