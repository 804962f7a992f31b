"""The ServerApp: parse the run config, then hand the grid to the phase runner (`server.runner`)."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, set_logger_propagation
from flwr.serverapp import Grid, ServerApp

from fed_userllm.server.runner import run
from fed_userllm.train.federated_config import FederatedConfig

# Flower's console handler prints each record; propagated to the root logger, which Opacus configures with
# logging.basicConfig when it is imported, every line of the run's log would be printed a second time.
set_logger_propagation(FLOWER_LOGGER, False)
# The library's own records (e.g. `fed_userllm.privacy.budget`) go to the same console, once.
PROJECT_LOGGER = logging.getLogger("fed_userllm")
PROJECT_LOGGER.setLevel(logging.INFO)
PROJECT_LOGGER.propagate = False
for handler in FLOWER_LOGGER.handlers:
    PROJECT_LOGGER.addHandler(handler)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, FederatedConfig.from_run_config(dict(context.run_config)))
