"""Built-in attention implementations; importing this package registers them.

Each module holds one family. Optional dependencies are imported inside the implementation,
so a missing library makes that implementation unavailable, never this package unimportable.
"""

from attnbench.impls import full, gpa, none, nystrom, performer, xformers_mea

__all__ = ["full", "gpa", "none", "nystrom", "performer", "xformers_mea"]
