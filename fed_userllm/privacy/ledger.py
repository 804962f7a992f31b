"""PrivacyLedger: the append-only, hash-chained record of the privacy budget a run has spent.

File format (JSON Lines, `privacy_ledger.jsonl` in the run directory):
- line 1, the header: the mechanism and every parameter the epsilon depends on, plus library versions;
- then one line per released round: round, epsilon at the header's delta, optionally the phase that ran it,
  for user-level DP the round's client sampling rate q (phases of one run may sample at different rates; a
  round without one used the header's) and `release`, a keyed digest of what the round released (see
  `release_digest`), and for sample-level DP the per-client DP-SGD (sample rate, steps) and the max/mean
  client epsilon.
The ledger is part of a run's public release, so a round line holds only what the accounting needs: no
cohort sizes, no timestamps (round durations follow the secret cohort size). Format 2 ledgers, whose lines
also held clients sampled/succeeded and a time, are still read and audited.
Every line carries `hash` = sha256(previous line's hash + canonical JSON of the line without `hash`),
starting from 64 zeros, so an edited, deleted or reordered line breaks the chain (tamper-evident, not
tamper-proof: someone who rewrites every later hash is caught only by `audit` recomputing epsilon from
the header, or by comparing `head_hash` with a copy kept elsewhere, e.g. in checkpoint metadata).

Write-ahead rule: call `record_round` after aggregating a round but BEFORE the new global model is
saved or sent. The budget is then charged before anything is released, a refused round
(PrivacyBudgetExceeded) is never released, and a line torn by a crash mid-append belongs to a round
that was never published. Torn lines are handled explicitly: opening the ledger raises TornLedgerError
and `PrivacyLedger.repair` truncates the file to its last complete line. Appends write one full line,
flush and fsync. Resuming continues the round numbers; nothing ever rewrites or resets the file.
"""

import hashlib
import hmac
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from fed_userllm.privacy.accounting import (
    ACCOUNTANTS,
    epsilon_from_history,
    extend_history,
    max_rounds_within_budget,
)
from fed_userllm.rundir import LEDGER

FORMAT_VERSION = 3  # 3: no cohort sizes or times, a release digest (2: own sampling rates; 1: the header's q)
GENESIS_HASH = "0" * 64
USER_LEVEL = "dp-fedavg-user"
SAMPLE_LEVEL = "dp-sgd-sample"
MECHANISMS = (USER_LEVEL, SAMPLE_LEVEL)
_LIBRARIES = ("opacus", "torch", "numpy", "flwr", "fed-userllm")

ClientSteps = Mapping[str, tuple[float, int]]  # client id -> (DP-SGD sample rate, local steps this round)


class LedgerError(RuntimeError):
    """The ledger is corrupt or was tampered with."""


class TornLedgerError(LedgerError):
    """The ledger ends with an incomplete line (a crash during an append)."""


class LedgerMismatchError(LedgerError):
    """An existing ledger was written with a different privacy configuration."""


class PrivacyBudgetExceeded(LedgerError):
    """Recording this round would push epsilon above the target; the round must not be released."""


@dataclass(frozen=True)
class LedgerConfig:
    """Everything epsilon depends on. Any change makes resuming an existing ledger fail.

    mechanism: "dp-fedavg-user" (server-side DP-FedAvg; one accounting step per round, sample_rate =
    client sampling rate q of rounds that do not state their own) or "dp-sgd-sample" (client-side
    DP-SGD; sample_rate = None since each client reports its own batch/dataset rate per round).
    num_clients is the client population N; delta is in the protected unit (users or examples).
    """

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    num_clients: int
    delta: float
    sample_rate: float | None = None
    accountant: str = "rdp"
    target_epsilon: float | None = None
    sampling: str = "poisson"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and > 0 for DP, got {self.noise_multiplier}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm must be finite and > 0 for DP, got {self.clip_norm}")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.mechanism == USER_LEVEL and (self.sample_rate is None or not 0 < self.sample_rate <= 1):
            raise ValueError(
                f"sample_rate (client sampling q) must be in (0, 1] for {USER_LEVEL}, got {self.sample_rate}"
            )
        if self.mechanism == SAMPLE_LEVEL and self.sample_rate is not None:
            raise ValueError(f"sample_rate must be None for {SAMPLE_LEVEL}: clients report their own rates per round")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon must be None or finite and > 0, got {self.target_epsilon}")
        if self.sampling != "poisson":
            raise ValueError(f"sampling must be 'poisson' (what the accountants assume), got {self.sampling!r}")

    @classmethod
    def from_header(cls, header: Mapping) -> "LedgerConfig":
        """The config stored in a ledger header; LedgerError if it is missing fields or invalid."""
        try:
            return cls(**{f.name: header[f.name] for f in fields(cls)})
        except (KeyError, TypeError, ValueError) as err:
            raise LedgerError(f"invalid ledger header: {err}") from err


def canonical_json(entry: Mapping) -> str:
    """Deterministic JSON (sorted keys, no spaces, no NaN/inf) so hashes are reproducible."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), allow_nan=False)


def chain_hash(previous_hash: str, entry: Mapping) -> str:
    """sha256(previous hash + canonical JSON of the entry without its own `hash` field)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256((previous_hash + canonical_json(body)).encode()).hexdigest()


def release_digest(key: bytes, arrays: Mapping[str, np.ndarray], **context: object) -> str:
    """HMAC-SHA256 under the run's secret ``key`` of a round's released tensors and its ``context`` (e.g. the
    phase, round, attempt, the cohort and who succeeded), in hex.

    Equal digests mean a bit-identical release of the same cohort, so a round redone after a crash may reuse
    its charge; any difference (other clients, another attempt, other noise) means a new release that is
    charged again. Keyed, so the public ledger reveals nothing about who was sampled.
    """
    mac = hmac.new(key, canonical_json(context).encode(), hashlib.sha256)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        mac.update(canonical_json([name, str(array.dtype), list(array.shape)]).encode())
        mac.update(array.tobytes())
    return mac.hexdigest()


@dataclass
class LedgerContents:
    """A ledger file as read from disk: its complete lines, any torn tail, and every integrity problem."""

    entries: list[dict]  # parseable complete lines, in file order (entries[0] should be the header)
    torn_tail: bytes  # bytes after the last newline (a crash mid-append); empty if none
    problems: list[str] = field(default_factory=list)

    @property
    def head_hash(self) -> str:
        return self.entries[-1].get("hash", "") if self.entries else GENESIS_HASH


def read_ledger(path: str | Path) -> LedgerContents:
    """Parse a ledger and check its hash chain and round sequence without trusting any of it."""
    data = Path(path).read_bytes()
    cut = data.rfind(b"\n") + 1
    contents = LedgerContents(entries=[], torn_tail=data[cut:])
    previous = GENESIS_HASH
    expected_round = 1
    for number, line in enumerate(data[:cut].splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            contents.problems.append(f"line {number}: not valid JSON (the file was corrupted or edited)")
            continue
        if not isinstance(entry, dict):
            contents.problems.append(f"line {number}: not a JSON object")
            continue
        if entry.get("hash") != chain_hash(previous, entry):
            contents.problems.append(
                f"line {number}: hash chain broken (this line was edited, or a line before it was deleted or moved)"
            )
        previous = str(entry.get("hash"))
        kind = "header" if number == 1 else "round"
        if entry.get("type") != kind:
            contents.problems.append(f"line {number}: type {entry.get('type')!r}, expected {kind!r}")
        elif kind == "round":
            if entry.get("round") != expected_round:
                contents.problems.append(
                    f"line {number}: round {entry.get('round')} where round {expected_round} was expected "
                    "(a round was deleted, duplicated or reordered)"
                )
            if isinstance(entry.get("round"), int):
                expected_round = entry["round"] + 1
        contents.entries.append(entry)
    if not contents.entries:
        contents.problems.append("no complete header line")
    return contents


@dataclass
class RoundEpsilon:
    """The epsilon figures a round implies, before it is committed to an EpsilonTracker."""

    fields: dict  # "epsilon" (+ "client_epsilon" for sample-level DP), as written to the ledger
    histories: dict[str, list[list]]  # sample-level: updated histories of this round's clients
    client_epsilon: dict[str, float]  # sample-level: updated epsilons of this round's clients
    history: list[list] | None = None  # user-level: the run's history [(sigma, q, rounds), ...] after the round


class EpsilonTracker:
    """Replays a ledger's mechanism round by round with one accountant (used by the ledger and the audit).

    User-level: the run's history [(sigma, q, rounds), ...] composes every round at its own sampling rate
    (one entry when all rounds share q: epsilon = accountant(sigma, q, steps=r)). Sample-level: each client
    has its own history of DP-SGD steps; a round's epsilon is the max over clients that have trained (the
    guarantee every example in the federation gets) and the mean over them is reported alongside.
    """

    def __init__(self, config: LedgerConfig, accountant: str) -> None:
        self.config = config
        self.accountant = accountant
        self.rounds = 0
        self.history: list[list] = []  # user-level
        self.histories: dict[str, list[list]] = {}
        self.client_epsilon: dict[str, float] = {}

    def propose(self, clients: ClientSteps | None = None, sample_rate: float | None = None) -> RoundEpsilon:
        """Epsilon figures after one more round (state unchanged until `commit`); user-level rounds sample at
        ``sample_rate`` (None: the header's)."""
        c = self.config
        if c.mechanism == USER_LEVEL:
            history = extend_history(self.history, c.noise_multiplier, sample_rate or c.sample_rate, 1)
            eps = epsilon_from_history(history, c.delta, self.accountant)
            return RoundEpsilon({"epsilon": eps}, {}, {}, history)
        histories = {
            cid: extend_history(self.histories.get(cid, []), c.noise_multiplier, q, steps)
            for cid, (q, steps) in (clients or {}).items()
        }
        updated = {cid: epsilon_from_history(h, c.delta, self.accountant) for cid, h in histories.items()}
        return RoundEpsilon(self._summary({**self.client_epsilon, **updated}), histories, updated)

    def commit(self, step: RoundEpsilon) -> None:
        self.rounds += 1
        if step.history is not None:
            self.history = step.history
        self.histories.update(step.histories)
        self.client_epsilon.update(step.client_epsilon)

    def advance(self, clients: ClientSteps | None = None, sample_rate: float | None = None) -> dict:
        """Account one more round and return its epsilon fields."""
        step = self.propose(clients, sample_rate)
        self.commit(step)
        return step.fields

    def replay(self, records: list[dict]) -> float:
        """Restore the state after `records` (as read from a ledger); return the epsilon spent.

        Cheaper than `advance` per round: each client's epsilon is computed once, from its final history.
        """
        c = self.config
        for record in records:
            self.rounds += 1
            if c.mechanism == USER_LEVEL:
                q = record.get("sample_rate") or c.sample_rate
                self.history = extend_history(self.history, c.noise_multiplier, q, 1)
            for cid, (q, steps) in record.get("clients", {}).items():
                self.histories[cid] = extend_history(self.histories.get(cid, []), c.noise_multiplier, q, steps)
        if c.mechanism == USER_LEVEL:
            return epsilon_from_history(self.history, c.delta, self.accountant)
        self.client_epsilon = {
            cid: epsilon_from_history(h, c.delta, self.accountant) for cid, h in self.histories.items()
        }
        return self._summary(self.client_epsilon)["epsilon"]

    def _summary(self, client_epsilon: dict[str, float]) -> dict:
        values = list(client_epsilon.values())
        return {
            "epsilon": max(values, default=0.0),
            "client_epsilon": {
                "max": max(values, default=0.0),
                "mean": sum(values) / len(values) if values else 0.0,
                "num_clients": len(values),
            },
        }


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries the figures depend on (None if not installed)."""
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PrivacyLedger:
    """Open (or create) the ledger of a run directory and append one record per completed round.

    Opening an existing ledger verifies its hash chain, refuses a different LedgerConfig
    (LedgerMismatchError), refuses a torn last line (TornLedgerError, see `repair`), re-derives the spent
    budget and checks it against the last record, then continues at round last+1.
    """

    def __init__(self, run_dir: str | Path, config: LedgerConfig) -> None:
        self.path = Path(run_dir) / LEDGER
        self.config = config
        self._tracker = EpsilonTracker(config, config.accountant)
        if self.path.exists():
            self._resume()
        else:
            self._create()

    @property
    def next_round(self) -> int:
        return self._tracker.rounds + 1

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (at config.delta, with config.accountant)."""
        return self._last["epsilon"] if self._tracker.rounds else 0.0

    @property
    def head_hash(self) -> str:
        """Hash of the last line; keep a copy elsewhere to detect truncation of the ledger's tail."""
        return self._last["hash"]

    def rounds_remaining(self, sample_rate: float | None = None) -> int | None:
        """User-level DP with a target epsilon: further rounds at ``sample_rate`` (None: the header's q) still
        affordable after the rounds spent so far (None without a target or for sample-level DP)."""
        c = self.config
        if c.mechanism != USER_LEVEL or c.target_epsilon is None:
            return None
        return max_rounds_within_budget(c.noise_multiplier, sample_rate or c.sample_rate, c.delta, c.target_epsilon,
                                        c.accountant, history=self._tracker.history)

    def record_round(
        self,
        client_steps: ClientSteps | None = None,
        sample_rate: float | None = None,
        phase: str | None = None,
        release: str | None = None,
    ) -> dict:
        """Charge the next round to the budget and append its record (write-ahead: before releasing it).

        client_steps (sample-level DP only, required there): for each client that succeeded, its DP-SGD
        (sample rate, local steps) in this round. sample_rate (user-level only): the round's client sampling
        rate q when it differs from the header's (e.g. a later phase samples fewer clients); the record
        always states the q it was charged at. phase: an optional label stored with the record. release: the
        round's `release_digest`. Raises PrivacyBudgetExceeded, writing nothing, if the round would take
        epsilon above config.target_epsilon.
        """
        clients = self._check_client_steps(client_steps)
        if sample_rate is not None and (self.config.mechanism != USER_LEVEL or not 0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be a client sampling rate in (0, 1] for {USER_LEVEL} rounds, got "
                             f"{sample_rate} for {self.config.mechanism}")
        step = self._tracker.propose(clients, sample_rate)
        target = self.config.target_epsilon
        if target is not None and step.fields["epsilon"] > target:
            raise PrivacyBudgetExceeded(
                f"round {self.next_round} would raise epsilon from {self.epsilon:.4f} to "
                f"{step.fields['epsilon']:.4f} > target {target} (delta={self.config.delta}); "
                "do not release this round"
            )
        record = {"type": "round", "round": self.next_round, **step.fields}
        if self.config.mechanism == USER_LEVEL:
            record["sample_rate"] = sample_rate or self.config.sample_rate
        if phase is not None:
            record["phase"] = phase
        if release is not None:
            record["release"] = release
        if clients is not None:
            record["clients"] = {cid: [q, steps] for cid, (q, steps) in clients.items()}
        self._append(record)
        self._tracker.commit(step)
        return record

    @staticmethod
    def repair(path: str | Path) -> bytes:
        """Truncate a torn ledger to its last complete line and return the dropped bytes (b"" if none).

        Safe under the write-ahead rule: the torn line's round was never released, so it is re-run.
        """
        path = Path(path)
        path = path / LEDGER if path.is_dir() else path
        data = path.read_bytes()
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            raise LedgerError(f"{path} has no complete header line; it holds no committed round")
        with open(path, "r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        return data[cut:]

    def _check_client_steps(self, client_steps: ClientSteps | None) -> dict | None:
        if self.config.mechanism == USER_LEVEL:
            if client_steps is not None:
                raise ValueError(f"client_steps is only for {SAMPLE_LEVEL}; {USER_LEVEL} accounts per round")
            return None
        if client_steps is None:
            raise ValueError(f"{SAMPLE_LEVEL} needs client_steps: the (sample rate, steps) of each client that "
                             "trained in the round ({} if none did)")
        clients = {}
        for cid, (q, steps) in client_steps.items():
            if not 0 < q <= 1:
                raise ValueError(f"client {cid}: sample rate must be in (0, 1], got {q}")
            if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 0:
                raise ValueError(f"client {cid}: steps must be an integer >= 0, got {steps!r}")
            clients[str(cid)] = (float(q), int(steps))
        return clients

    def _create(self) -> None:
        header = {
            "type": "header",
            "format": FORMAT_VERSION,
            **asdict(self.config),
            "versions": library_versions(),
            "created": _now(),
        }
        header["hash"] = chain_hash(GENESIS_HASH, header)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:  # header appears atomically: a crash leaves no ledger or a whole one
            f.write((canonical_json(header) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._last = header

    def _resume(self) -> None:
        contents = read_ledger(self.path)
        if contents.torn_tail:
            raise TornLedgerError(
                f"{self.path} ends with an incomplete line ({len(contents.torn_tail)} bytes): a crash during "
                "an append. That round was never released (write-ahead), so run "
                f"PrivacyLedger.repair({str(self.path)!r}) to drop it, then resume."
            )
        if contents.problems:
            raise LedgerError(f"{self.path} failed verification: " + "; ".join(contents.problems))
        stored = LedgerConfig.from_header(contents.entries[0])
        if stored != self.config:
            diffs = [
                f"{f.name}: ledger {getattr(stored, f.name)!r} != requested {getattr(self.config, f.name)!r}"
                for f in fields(LedgerConfig)
                if getattr(stored, f.name) != getattr(self.config, f.name)
            ]
            raise LedgerMismatchError(
                f"{self.path} was written with a different privacy configuration ({'; '.join(diffs)}); "
                "resuming would misstate the budget. Use a new run directory."
            )
        records = contents.entries[1:]
        spent = self._tracker.replay(records)
        self._last = contents.entries[-1]
        if records and not math.isclose(spent, self._last["epsilon"], rel_tol=1e-9, abs_tol=1e-12):
            raise LedgerError(
                f"{self.path}: last record says epsilon={self._last['epsilon']} but its mechanism gives "
                f"{spent}; the ledger was altered. Run the audit."
            )

    def _append(self, record: dict) -> None:
        record["hash"] = chain_hash(self._last["hash"], record)
        line = (canonical_json(record) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._last = record
