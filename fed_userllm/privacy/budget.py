"""A federated run's privacy budget policy: delta and the noise multiplier resolved from the settings (sigma
calibrated to a target epsilon, a plan that cannot fit refused before training), the ledger opened or verified on
resume, and every round charged before anything of it is released (`Budget.charge`)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fed_userllm.privacy.accounting import (
    calibrate_noise,
    calibrate_noise_for_plan,
    default_delta,
    epsilon_from_history,
    max_rounds_within_budget,
)
from fed_userllm.privacy.ledger import (
    SAMPLE_LEVEL,
    USER_LEVEL,
    LedgerConfig,
    LedgerError,
    PrivacyLedger,
    read_ledger,
)

if TYPE_CHECKING:
    from fed_userllm.train.federated_config import FederatedConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Privacy:
    """The resolved privacy settings of a run (noise multiplier calibrated when a target is set)."""

    mechanism: str | None  # USER_LEVEL, SAMPLE_LEVEL or None
    noise_multiplier: float
    delta: float | None
    max_rounds: int | None  # user-level DP with a target epsilon: rounds the budget affords


def resolve_privacy(cfg: FederatedConfig, num_clients: int, num_examples: int) -> Privacy:
    """Delta, the noise multiplier, and the round budget under ``target-epsilon``.

    Delta defaults to min(1e-5, 1/N**1.1) for N protected units: the ``num_clients`` clients under user-level
    DP, the ``num_examples`` training windows of the whole federation under sample-level DP.

    ``noise-multiplier=0`` with a target calibrates sigma. User-level: so that all planned rounds (num-rounds
    per phase) fit the target; a given sigma whose planned rounds do not fit is refused before training.
    Sample-level: for the worst-case client, one that takes part in every round with full-batch DP-SGD steps
    (sample rate 1, the pretrain phase's ``local-steps`` or ``local-epochs`` steps per round: DP-SGD trains
    the encoder only). Either way the ledger refuses any round that would exceed the target. The round budget
    reported is at the pretrain phase's q.
    """
    dp, pretrain = cfg.dp, cfg.pretrain
    if dp.mode == "none":
        return Privacy(None, 0.0, None, None)
    units = num_clients if dp.mode == "user" else num_examples
    delta = dp.target_delta or default_delta(units)
    plan = [(phase.fraction_train, phase.rounds) for phase in map(cfg.phase, cfg.phases)]
    rounds = sum(r for _, r in plan)  # each phase's rounds at its own q, composed in order
    sigma = dp.noise_multiplier
    if dp.mode == "user":
        if not dp.target_epsilon:
            return Privacy(USER_LEVEL, sigma, delta, None)
        if not sigma:
            sigma = calibrate_noise_for_plan(dp.target_epsilon, delta, plan, dp.accountant)
            log.info("fed-userllm: noise multiplier calibrated to %.4f for epsilon=%s over %d rounds", sigma,
                dp.target_epsilon, rounds)
        max_rounds = max_rounds_within_budget(sigma, pretrain.fraction_train, delta, dp.target_epsilon,
                                              dp.accountant)
        spent = epsilon_from_history([(sigma, q, r) for q, r in plan], delta, dp.accountant)
        if spent > dp.target_epsilon:
            per_phase = ", ".join(f"{name}: {r} at q={q:g}" for name, (q, r) in zip(cfg.phases, plan, strict=True))
            raise ValueError(
                f"num-rounds={pretrain.rounds} ({rounds} rounds over phases {','.join(cfg.phases)!r}) exceeds the "
                f"privacy budget: with noise-multiplier={sigma} and delta={delta:.3g} the planned rounds ({per_phase}) "
                f"spend epsilon {spent:.4g} > target-epsilon={dp.target_epsilon} (only {max_rounds} rounds fit "
                f"at fraction-train={pretrain.fraction_train}). Lower num-rounds or llm-rounds, raise "
                "noise-multiplier, or set noise-multiplier=0 to calibrate it to the target")
        return Privacy(USER_LEVEL, sigma, delta, max_rounds)
    if dp.target_epsilon and not sigma:
        steps = (pretrain.local_steps or pretrain.local_epochs) * rounds
        sigma = calibrate_noise(dp.target_epsilon, delta, 1.0, steps, dp.accountant)
        log.info("fed-userllm: DP-SGD noise multiplier calibrated to %.4f for epsilon=%s", sigma,
            dp.target_epsilon)
    return Privacy(SAMPLE_LEVEL, sigma, delta, None)


def open_ledger(run_dir: Path, cfg: FederatedConfig, num_clients: int, privacy: Privacy,
                checkpoint_head: str | None = None) -> PrivacyLedger | None:
    """The run's privacy ledger (created, or verified and continued on resume); None without DP.

    On resume the ledger must still hold the line whose hash the checkpoint recorded: a truncated or
    replaced ledger would silently forget spent budget.
    """
    if privacy.mechanism is None:
        return None
    ledger = PrivacyLedger(run_dir, LedgerConfig(
        mechanism=privacy.mechanism, noise_multiplier=privacy.noise_multiplier, clip_norm=cfg.dp.clip_norm,
        num_clients=num_clients, delta=privacy.delta,
        sample_rate=cfg.phase(cfg.phases[0]).fraction_train if privacy.mechanism == USER_LEVEL else None,
        accountant=cfg.dp.accountant, target_epsilon=cfg.dp.target_epsilon or None))
    if checkpoint_head and checkpoint_head not in {e.get("hash") for e in read_ledger(ledger.path).entries}:
        raise LedgerError(f"{ledger.path} no longer holds the line {checkpoint_head} that checkpoint.pt "
                          "recorded: the ledger was truncated or replaced, and would understate epsilon")
    return ledger


def charged_after(ledger: PrivacyLedger | None, head: str | None) -> dict | None:
    """The ledger's round line written after the checkpoint's head line, if any (at most one: a round is
    charged, then checkpointed)."""
    if ledger is None or head is None:
        return None
    entries = read_ledger(ledger.path).entries
    after = entries[[e.get("hash") for e in entries].index(head) + 1:]
    if len(after) > 1:
        raise LedgerError(f"{ledger.path} holds {len(after)} rounds after the checkpoint's last one; a run "
                          "charges one round before each checkpoint, so the ledger or checkpoint was altered")
    return after[0] if after else None


def ledger_key(dp_seed: int) -> bytes:
    """The key of the run's release digests: a one-way hash of the secret seed, so the public ledger's digests
    can be neither recomputed nor inverted without it."""
    return hashlib.sha256(f"fed-userllm ledger {dp_seed}".encode()).digest()


@dataclass
class Budget:
    """What a run spends: its resolved privacy, its ledger (None without DP) and, after a crash, the round the
    ledger charged but the checkpoint never recorded."""

    privacy: Privacy
    ledger: PrivacyLedger | None
    pending: dict | None = None

    def charge(self, phase: str, sample_rate: float, release: str,
               client_steps: dict[str, tuple[float, int]] | None = None) -> dict:
        """Write the round's ledger line (before anything is released) and return its epsilon figures.

        User-level rounds are charged at their phase's client sampling rate ``sample_rate``; DP-SGD rounds by
        each client's ``client_steps`` {partition id: (its DP-SGD sample rate, steps)}. A user-level round
        redone after a crash that charged but did not checkpoint it reuses that charge if and only if the
        redone release is bit-identical (same `release_digest`: tensors, cohort, successful clients, attempt);
        anything else is another release and is charged again. DP-SGD rounds are always charged: their
        clients draw fresh noise."""
        pending, self.pending = self.pending, None
        if pending is not None and self.privacy.mechanism == USER_LEVEL:
            if pending.get("release") == release:
                log.info("fed-userllm: round %d of the ledger was charged before the crash; the redone round "
                    "is the same release (bit-identical) and is not charged again", pending["round"])
                return {"epsilon": pending["epsilon"], "delta": self.privacy.delta}
            log.warning("fed-userllm: round %d of the ledger was charged before the crash, but the redone round "
                "releases something else (other clients succeeded, another attempt or other tensors): it is "
                "charged again", pending["round"])
        sample_level = self.privacy.mechanism == SAMPLE_LEVEL
        entry = self.ledger.record_round(client_steps if sample_level else None,
                                         None if sample_level else sample_rate, phase,
                                         None if sample_level else release)
        figures = {"epsilon": entry["epsilon"], "delta": self.privacy.delta}
        if sample_level:
            figures |= {"client_epsilon_max": entry["client_epsilon"]["max"],
                        "client_epsilon_mean": entry["client_epsilon"]["mean"]}
        return figures
