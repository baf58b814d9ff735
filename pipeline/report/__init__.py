"""Results a person can look at: the self-contained run report and the interactive 3D viewer.

`write_report` / `write_index` need only numpy and Pillow. `view_run` imports viser (and
torch, through the object loader) inside the function, so importing this package stays cheap.
"""

from pipeline.report.html import write_index, write_report

__all__ = ["write_index", "write_report", "view_run"]


def view_run(*args, **kwargs):  # type: ignore[no-untyped-def]
    """Serve the run's composed scene in viser; see `pipeline.report.viewer.view_run`."""
    from pipeline.report.viewer import view_run as _view_run

    return _view_run(*args, **kwargs)
