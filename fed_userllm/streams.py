"""Named random streams. Every seeded draw is ``np.random.default_rng([seed, ..., STREAM])`` (or a
SeedSequence) with the id of its purpose, so no two purposes share random numbers; the ids are part of every
run's results: never renumber them, add new ones."""

COHORT = 0  # server: the round's Poisson cohort (DP sampling)
NOISE = 1  # server: the round's DP noise
VALIDATION_CLIENTS = 2  # server: the fixed sample of clients in validation evaluations
TEST_CLIENTS = 3  # server: the fixed sample of clients in the final test evaluation
FAULTS = 7  # client: injected faults (tests, benchmarks)
LLM_TRAINING = 1  # client: the contextualize phase's local batches and dropout (pretrain's have no id)
