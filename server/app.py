"""The ServerApp: parse the run config, then hand the grid to the phase runner (`server.runner`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, set_logger_propagation
from flwr.serverapp import Grid, ServerApp

from fed_userllm.clients.config import FederatedConfig
from fed_userllm.server.runner import run

# Flower's console handler prints each record; propagated to the root logger, which Opacus configures with
# logging.basicConfig when it is imported, every line of the run's log would be printed a second time.
set_logger_propagation(FLOWER_LOGGER, False)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, FederatedConfig.from_run_config(dict(context.run_config)))
