"""Experiment kinds, by the name suites and rows give them: ``micro`` and ``train``.

Each is a :class:`~attnbench.kinds.base.Kind` in a package of its own; the harness and the
suite loader find a suite's kind here.
"""

from attnbench.kinds.base import Kind
from attnbench.kinds.micro import KIND as MICRO
from attnbench.kinds.train import KIND as TRAIN

KINDS: dict[str, Kind] = {kind.name: kind for kind in (MICRO, TRAIN)}

__all__ = ["KINDS", "Kind"]
