"""Built-in attention implementations; importing this package registers them.

Each module holds one family. Optional dependencies are imported inside the implementation,
so a missing library makes that implementation unavailable, never this package unimportable.
"""

from attnbench.impls import (
    full,
    gpa,
    neighborhood,
    none,
    nystrom,
    performer,
    routed,
    window,
    xformers_mea,
)

__all__ = [
    "full",
    "gpa",
    "neighborhood",
    "none",
    "nystrom",
    "performer",
    "routed",
    "window",
    "xformers_mea",
]
