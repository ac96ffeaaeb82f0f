"""qd_app ServerApp: validates the run settings, finds the method they name and runs the phase
(:func:`qd_app.server.experiment.run_phase`)."""

from logging import ERROR

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from .config import RunConfig
from .errors import UserFacingError
from .methods import resolve_method
from .server.experiment import run_phase

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the experiment the run config describes."""
    try:
        config = RunConfig.from_run_config(context.run_config)
        run_phase(grid, config, resolve_method(config.method))
    except UserFacingError as exc:
        log(ERROR, "%s", exc)
        raise
