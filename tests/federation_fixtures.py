"""Run-config pieces shared by the tests that run the Flower app: a tiny federation of 12 one-user clients and
the training values those tests were written for (the app's defaults are a DP recipe sized for 610 users)."""

USERS = 12
DATASET = f"synthetic:users={USERS},items=40,genres=4,events=12"
MAX_LEN = 8
TINY_FEDERATION = {"dataset": DATASET, "max-len": MAX_LEN, "d-model": 16, "n-layers": 1, "n-heads": 2,
                   "item-dim": 8, "batch-size": 4}
PINNED = {"item-features": "learned", "local-steps": 0, "server-lr": 0.1, "server-tau": 0.001,
          "noise-multiplier": 1.0, "target-epsilon": 0.0, "fraction-train": 0.5, "lr": 0.5,
          "llm-objective": "lm", "llm-user-tokens": "events"}
