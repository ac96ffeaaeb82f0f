"""qd_app ServerApp: validates the run settings and runs the phase with the chosen method
(:func:`qd_app.server.experiment.run_phase`)."""

from logging import ERROR

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .errors import UserFacingError
from .server.experiment import run_phase

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment the run config describes."""
    try:
        run_phase(grid, RunConfig.from_run_config(context.run_config))
    except UserFacingError as exc:
        log(ERROR, "%s", exc)
        raise
