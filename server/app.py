"""The ServerApp: parse the run config, then hand the grid to the phase runner (`server.runner`)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fed_userllm.clients.config import FederatedConfig
from fed_userllm.server.runner import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, FederatedConfig.from_run_config(dict(context.run_config)))
