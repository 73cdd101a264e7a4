"""attnbench: benchmarks and training tasks for attention layers on images.

Built around Grid Partitioned Attention (GPA; Jetchev, Yildirim, Bracher, Vollgraf 2021,
arXiv 2107.03742). Importing this package is cheap; torch is imported by the modules that
need it (``attnbench.registry``, ``attnbench.spec``, ...).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"
