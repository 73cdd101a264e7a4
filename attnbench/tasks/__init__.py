"""Training tasks from the GPA paper (Jetchev et al. 2021): affine copying and pose morphing.

Each task is a :class:`~attnbench.tasks.training.Task` (its data, losses and metrics) trained
by the one loop of :mod:`attnbench.tasks.training`; the runner finds it here by name.
"""

from attnbench.tasks.copying import CopyingTask
from attnbench.tasks.pose import PoseTask

TASKS = {task.name: task for task in (CopyingTask, PoseTask)}

__all__ = ["TASKS", "CopyingTask", "PoseTask"]
