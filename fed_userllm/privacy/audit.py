"""Independent audit of a privacy ledger: hash chain, round sequence, and epsilon recomputed two ways.

Usage: python -m fed_userllm.privacy RUN_DIR_OR_LEDGER [--json] [--head HASH]   (exit code 1 on any problem)
"""

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fed_userllm.privacy.accounting import PRV_EPS_ERROR
from fed_userllm.privacy.ledger import (
    SAMPLE_LEVEL,
    EpsilonTracker,
    LedgerConfig,
    LedgerError,
    library_versions,
    read_ledger,
)
from fed_userllm.rundir import LEDGER

NOTES = (
    "Both figures are (epsilon, delta)-DP guarantees for Poisson-subsampled Gaussian composition with "
    "add/remove-one neighbours, computed with Opacus from the ledger header alone. RDP converts Renyi DP "
    "over a grid of orders to (epsilon, delta) (Balle et al. 2020): a valid but loose upper bound. PRV "
    "(Gopi et al. 2021) numerically composes the privacy loss distribution and is tighter; Opacus returns "
    f"its upper bound, within {PRV_EPS_ERROR} of the exact value, so PRV can exceed RDP only for tiny epsilons. "
    "A hash chain is tamper-evident, not tamper-proof: compare the head hash with a copy kept elsewhere."
)


@dataclass
class RoundAudit:
    round: int
    recorded_epsilon: float
    rdp_epsilon: float
    prv_epsilon: float
    sample_rate: float | None = None  # user-level: the client sampling rate q the round was charged at
    phase: str | None = None


@dataclass
class AuditReport:
    """Outcome of `audit`: ok is True only if no problem at all was found."""

    path: str
    header: dict
    rounds: list[RoundAudit]
    problems: list[str]
    head_hash: str
    warnings: list[str] = field(default_factory=list)  # worth knowing, but not a failure
    notes: str = NOTES
    current_versions: dict = field(default_factory=library_versions)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, **asdict(self)}, indent=2)

    def to_text(self) -> str:
        h = self.header
        lines = [f"Privacy ledger audit: {self.path}"]
        if h:
            q = "per-client rates"
            if h.get("sample_rate") is not None:
                q = f"q={h.get('sample_rate')} unless a round states its own"
            lines.append(
                f"Mechanism {h.get('mechanism')}: Poisson sampling ({q}), N={h.get('num_clients')} clients, "
                f"sigma={h.get('noise_multiplier')}, C={h.get('clip_norm')}, delta={h.get('delta')}, "
                f"ledger accountant {h.get('accountant')}, target epsilon {h.get('target_epsilon')}"
            )
        lines.append(f"Rounds: {len(self.rounds)}; head hash {self.head_hash}")
        if self.rounds:
            lines.append(
                f"{'round':>6} {'recorded':>10} {'rdp':>10} {'prv':>10} {'q':>8} phase"
            )
            lines += [
                f"{r.round:>6} {r.recorded_epsilon:>10.4f} {r.rdp_epsilon:>10.4f} {r.prv_epsilon:>10.4f} "
                f"{'-' if r.sample_rate is None else f'{r.sample_rate:.4g}':>8} {r.phase or '-'}"
                for r in self.rounds
            ]
            last = self.rounds[-1]
            lines.append(
                f"Final epsilon at delta={h.get('delta')}: RDP {last.rdp_epsilon:.4f}, PRV {last.prv_epsilon:.4f}"
            )
        lines.append("Result: OK" if self.ok else f"Result: FAILED ({len(self.problems)} problems)")
        lines += [f"  - {p}" for p in self.problems]
        lines += [f"Warning: {w}" for w in self.warnings]
        lines.append(f"Notes: {self.notes}")
        return "\n".join(lines)


def _close(a: float, b: float, rel_tol: float) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-12)


def audit(path: str | Path, expected_head_hash: str | None = None, rel_tol: float = 1e-6) -> AuditReport:
    """Verify a ledger (file or run directory) and recompute its epsilon after every round.

    The ledger's own figures are checked (to rel_tol) against the accountant it names; RDP and PRV
    are both reported. Every integrity problem becomes one readable line in `problems`.
    """
    path = Path(path)
    path = path / LEDGER if path.is_dir() else path
    contents = read_ledger(path)
    problems = list(contents.problems)
    if contents.torn_tail:
        problems.append(
            f"the file ends with an incomplete line ({len(contents.torn_tail)} bytes, a crash during an append); "
            "that round was never released; PrivacyLedger.repair drops it"
        )
    if expected_head_hash is not None and contents.head_hash != expected_head_hash:
        problems.append(
            f"head hash {contents.head_hash} != expected {expected_head_hash} (lines were removed from or added "
            "to the end)"
        )
    header = contents.entries[0] if contents.entries and contents.entries[0].get("type") == "header" else {}
    report = AuditReport(str(path), header, [], problems, contents.head_hash)
    try:
        config = LedgerConfig.from_header(header)
    except LedgerError as err:
        problems.append(f"cannot recompute epsilon: {err}")
        return report
    recorded_versions = header.get("versions", {})
    if recorded_versions.get("opacus") != report.current_versions["opacus"]:
        report.warnings.append(
            f"the ledger was written with opacus {recorded_versions.get('opacus')} but this audit runs "
            f"{report.current_versions['opacus']}; figures may differ slightly"
        )

    trackers = {name: EpsilonTracker(config, name) for name in ("rdp", "prv")}
    for record in contents.entries[1:]:
        where = f"round {record.get('round')}"
        try:
            clients = {cid: tuple(v) for cid, v in record["clients"].items()} if "clients" in record else None
            q = None if config.mechanism == SAMPLE_LEVEL else float(record.get("sample_rate") or config.sample_rate)
            if q is not None and not 0 < q <= 1:
                raise ValueError(f"sample_rate {q} is not a sampling rate in (0, 1]")
            figures = {name: tracker.advance(clients, q) for name, tracker in trackers.items()}
            row = RoundAudit(
                round=record["round"],
                recorded_epsilon=float(record["epsilon"]),
                rdp_epsilon=figures["rdp"]["epsilon"],
                prv_epsilon=figures["prv"]["epsilon"],
                sample_rate=q,
                phase=record.get("phase"),
            )
        except (KeyError, TypeError, ValueError) as err:
            problems.append(f"{where}: malformed record ({err!r})")
            continue
        report.rounds.append(row)
        expected = figures[config.accountant]
        if not _close(row.recorded_epsilon, expected["epsilon"], rel_tol):
            problems.append(
                f"{where}: recorded epsilon {row.recorded_epsilon} != {expected['epsilon']} recomputed with "
                f"{config.accountant} from the header"
            )
        if config.mechanism == SAMPLE_LEVEL:
            recorded = record.get("client_epsilon", {})
            for key in ("max", "mean"):
                if not _close(float(recorded.get(key, math.nan)), expected["client_epsilon"][key], rel_tol):
                    problems.append(
                        f"{where}: recorded client epsilon {key} {recorded.get(key)} != "
                        f"{expected['client_epsilon'][key]} recomputed"
                    )
            if clients is None:
                problems.append(f"{where}: no per-client DP-SGD steps, so its epsilon cannot be recomputed")
        target = config.target_epsilon
        if target is not None and row.recorded_epsilon > target:
            problems.append(f"{where}: epsilon {row.recorded_epsilon} exceeds the target {target}")
    return report

