"""Every table of ``attnbench report``, in report order (:data:`TABLES`).

A table is a function of the result frame (:func:`attnbench.results.load`): the micro tables
are in :mod:`.micro_tables`, the training tables in :mod:`.train_tables`, the rows not run in
:mod:`.not_run_table`, and what they share in :mod:`.table`. A table of a new kind of row is one
such function: select the rows, group them into :class:`~.table.Section` s with
:func:`~.table.group_by`, aggregate the records with :func:`~.train_tables.seed_stats` or pandas,
and list it here.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from attnbench.report.discovery import discovery_table
from attnbench.report.micro_tables import (
    fidelity_table,
    kappa_fidelity_table,
    micro_table,
    scaling_table,
)
from attnbench.report.not_run_table import not_run_table
from attnbench.report.table import Table, prepare
from attnbench.report.train_tables import kappa_training_table, task_tables

# Each makes one table, or a list of them (one per task).
TABLES: tuple[Callable[[pd.DataFrame], Table | list[Table]], ...] = (
    micro_table,
    scaling_table,
    fidelity_table,
    task_tables,
    discovery_table,
    kappa_training_table,
    kappa_fidelity_table,
    not_run_table,
)


def all_tables(rows: pd.DataFrame) -> list[Table]:
    """Every table, in report order."""
    rows = prepare(rows)
    made = [make(rows) for make in TABLES]
    return [table for item in made for table in (item if isinstance(item, list) else [item])]
