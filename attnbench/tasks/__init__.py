"""Training tasks from the GPA paper (Jetchev et al. 2021): affine copying and pose morphing.

Each task is a :class:`~attnbench.tasks.base.Task` (its settings, checks, data, losses, metrics,
grid and report table) in its own module, trained by the one loop of
:mod:`attnbench.tasks.training`; suites and the report find it here by name. A new task is one
module and one entry of :data:`TASKS`.
"""

from attnbench.tasks.copying import CopyingTask
from attnbench.tasks.pose import PoseTask

TASKS = {task.name: task for task in (CopyingTask, PoseTask)}

__all__ = ["TASKS", "CopyingTask", "PoseTask"]
