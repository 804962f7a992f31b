"""Run-config pieces shared by the tests that run the Flower app: a tiny federation of 12 one-user clients and
the training values those tests were written for (the app's defaults are a DP recipe sized for 610 users), and a
server crash between a round's release and its checkpoint."""

from collections.abc import Callable

from fed_userllm.rundir import RunDir

USERS = 12
DATASET = f"synthetic:users={USERS},items=40,genres=4,events=12"
MAX_LEN = 8
TINY_FEDERATION = {"dataset": DATASET, "max-len": MAX_LEN, "d-model": 16, "n-layers": 1, "n-heads": 2,
                   "item-dim": 8, "batch-size": 4}
PINNED = {"item-features": "learned", "local-steps": 0, "server-lr": 0.1, "server-tau": 0.001,
          "noise-multiplier": 1.0, "target-epsilon": 0.0, "fraction-train": 0.5, "lr": 0.5,
          "llm-objective": "lm", "llm-user-tokens": "events"}


def crash_after_release_of_round_2(monkeypatch) -> Callable[[], None]:
    """Make the server die between round 2's ledger line and its checkpoint (the metrics line is written in
    between); returns what undoes it."""
    real_append = RunDir.append_metrics

    def crash_at_round_2(run, record):
        if record.get("round") == 2:
            raise KeyboardInterrupt("server killed between the ledger line and the checkpoint")
        real_append(run, record)

    monkeypatch.setattr(RunDir, "append_metrics", crash_at_round_2)
    return lambda: monkeypatch.setattr(RunDir, "append_metrics", real_append)
