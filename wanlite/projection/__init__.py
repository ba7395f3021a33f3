"""Coherent teacher -> student projection by index selection (DESIGN.md §5).

calibrate (statistics) -> select (index choice) -> slicing (apply to every tensor)
-> project (orchestration, output, report).
"""

from wanlite.projection.project import (
    ProjectionError,
    ProjectionJob,
    prepare_projection,
    project_step,
    project_student,
    run_projection,
)

__all__ = [
    "ProjectionError",
    "ProjectionJob",
    "prepare_projection",
    "project_step",
    "project_student",
    "run_projection",
]
