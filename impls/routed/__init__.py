"""GPA's block-routed relatives: BiFormer's BRA, VSA, MoBA and NSA's selection branch.

Each is a configuration of one router (:mod:`.router`) over one phase 2 (:mod:`.attend`);
importing this package registers ``bra.torch``, ``vsa.torch``, ``moba.torch``, ``nsa.torch``.
"""

from attnbench.impls.routed import bra, moba, nsa, vsa

__all__ = ["bra", "moba", "nsa", "vsa"]
