"""attnbench: benchmarks and training tasks for attention layers on images.

Built around Grid Partitioned Attention (GPA; Jetchev, Yildirim, Bracher, Vollgraf 2021,
arXiv 2107.03742). Importing this package is cheap; torch is imported by the modules that
need it (``attnbench.registry``, ``attnbench.spec``, ...).
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attnbench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops the "No CUDA runtime is found" warning that importing torch.utils.cpp_extension
    prints on machines without CUDA (Inductor and gpa.cpp's build import it): attnbench builds
    only CPU C++ there, so the notice is noise on every command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())
