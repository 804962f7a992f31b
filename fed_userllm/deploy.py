"""Run the Flower app on Flower's Deployment Engine on this machine: one SuperLink and N SuperNodes on loopback.

Simulation runs every client inside one process tree that Flower manages; the Deployment Engine is what a real
federation runs (a long-lived ``flower-superlink`` and one ``flower-supernode`` per device). `LocalDeployment`
starts exactly that on 127.0.0.1 with free ports, gives SuperNode *i* its partition through
``--node-config "partition-id=i num-partitions=N"``, writes the connection into a private ``FLWR_HOME`` (the
user's ``~/.flwr`` is never touched), submits runs with ``flwr run`` and, on exit, stops every process it started
and all their descendants (SuperExec, ServerApp, ClientApp) by PID.

Options: ``tls`` generates a CA and a server certificate for 127.0.0.1/localhost and serves every SuperLink API
over TLS; ``auth`` (which needs TLS) turns on SuperNode authentication: one EC P-384 key pair per SuperNode,
each public key registered with ``flwr supernode register`` before its SuperNode connects.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fed_userllm.rundir import RunDir

APP = Path(__file__).resolve().parents[1] / "simulations" / "movielens"
CONNECTION = "local-deployment"
# Real SuperNodes: send a whole round at once (max-in-flight only throttles the simulation engine's polling).
DEPLOYMENT_RUN_CONFIG = "max-in-flight=0"
FINISHED = "fed-userllm: finished"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(folder: Path, days: int = 30) -> dict[str, Path]:
    """A private CA and a server certificate signed by it, valid for localhost, 127.0.0.1 and ::1.

    Returns the paths of ``ca.crt``, ``server.crt`` and ``server.key`` (PEM). The CA key is not written: it
    signs this one certificate and is thrown away, so nothing else can ever be issued under it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fed-userllm local deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return paths


def make_supernode_keys(folder: Path, index: int) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, the format ``flower-supernode`` and ``flwr supernode register``
    read; returns (private key, public key)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"supernode-{index}", folder / f"supernode-{index}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


class LocalDeployment:
    """A SuperLink and ``supernodes`` SuperNodes on loopback, with their logs, keys and ``FLWR_HOME`` in ``workdir``.

    Use as a context manager: ``__enter__`` starts the federation and returns once every SuperNode is online;
    ``__exit__`` stops every started process and its descendants, whatever happened in between.
    """

    def __init__(self, supernodes: int, workdir: str | Path, tls: bool = False, auth: bool = False,
                 app: str | Path = APP, startup_timeout: float = 120.0,
                 echo: bool = True) -> None:
        if supernodes < 1:
            raise ValueError(f"supernodes={supernodes}: expected >= 1")
        if auth and not tls:
            raise ValueError("auth=True needs tls=True: Flower's SuperNode authentication requires TLS")
        self.app = Path(app).resolve()
        if not (self.app / "pyproject.toml").is_file():
            raise FileNotFoundError(f"no Flower app at {self.app} (expected {self.app / 'pyproject.toml'})")
        self.supernodes, self.tls, self.auth = supernodes, tls, auth
        self.workdir = Path(workdir).resolve()
        self.flwr_home, self.logs = self.workdir / "flwr-home", self.workdir / "logs"
        self.startup_timeout = startup_timeout
        self.echo_output = echo
        self.bin = Path(sys.executable).parent
        self.port = 0
        self.certificates: dict[str, Path] = {}
        self.processes: list[subprocess.Popen] = []
        self.stopped_pids: list[int] = []
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    # SuperLink and SuperNodes start flower-superexec from PATH: this environment's, not another.
                    "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}"}

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, register SuperNode keys (auth), start the SuperNodes, wait until all are online."""
        for tool in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (self.bin / tool).exists():
                raise FileNotFoundError(f"{self.bin / tool} not found: install flwr 1.41 in this environment")
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.tls:
            self.certificates = make_certificates(self.workdir / "certs")
            self.echo(f"deploy: TLS certificates (CA {self.certificates['ca']}) in {self.workdir / 'certs'}")
        self.port = free_port()
        self._write_connection()
        link = ["--port", str(self.port), "--disable-runtime-dependency-installation"]
        if self.tls:
            link += ["--ssl-ca-certfile", str(self.certificates["ca"]), "--ssl-certfile",
                     str(self.certificates["cert"]), "--ssl-keyfile", str(self.certificates["key"])]
        else:
            link.append("--insecure")
        if self.auth:
            link.append("--enable-supernode-auth")
        self._spawn("superlink", "flower-superlink", link)
        self.echo(f"deploy: SuperLink at {self.address} (pid {self.processes[0].pid}, "
                  f"{'TLS' if self.tls else 'insecure'}{', SuperNode auth' if self.auth else ''})")
        self._wait_for_nodes(0, "the SuperLink to answer")
        for i in range(self.supernodes):
            node = ["--superlink", self.address, "--port", str(free_port()),
                    "--node-config", f"partition-id={i} num-partitions={self.supernodes}"]
            node += ["--root-certificates", str(self.certificates["ca"])] if self.tls else ["--insecure"]
            if self.auth:
                private, public = make_supernode_keys(self.workdir / "keys", i)
                self._flwr(["supernode", "register", str(public), CONNECTION])
                node += ["--auth-supernode-private-key", str(private)]
            self._spawn(f"supernode-{i}", "flower-supernode", node)
            self.echo(f"deploy: SuperNode {i + 1}/{self.supernodes} partition-id={i} (pid {self.processes[-1].pid})")
        self._wait_for_nodes(self.supernodes, f"{self.supernodes} SuperNodes to come online")
        self.echo(f"deploy: federation ready: {self.supernodes} SuperNodes online; logs in {self.logs}")

    def stop(self) -> list[int]:
        """Terminate every started process and all its descendants (by PID), kill what outlives 15 s.

        Descendants are collected before anything is signalled: the SuperLink's SuperExec runs in its own
        session and would otherwise be orphaned, out of reach, when its parent dies.
        """
        procs: dict[int, psutil.Process] = {}
        for popen in self.processes:
            try:
                root = psutil.Process(popen.pid)
                procs |= {p.pid: p for p in [root, *root.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        for proc in procs.values():
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(procs.values()), timeout=15)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for popen in self.processes:
            popen.wait(timeout=5)  # reap our direct children so no zombie remains
        if self.processes:
            self.echo(f"deploy: stopped {len(procs)} processes (pids {', '.join(map(str, sorted(procs)))})")
        self.stopped_pids += sorted(procs)
        self.processes = []
        return sorted(procs)

    # --- runs --------------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, run_config: str = "", run_dir: str | Path | None = None, timeout: float | None = None) -> Path:
        """``flwr run APP local-deployment --stream`` with ``run_config``; returns the run directory.

        The run directory is made absolute (relative paths would resolve against the SuperLink's directory):
        ``run_dir``, else a ``run-dir`` in ``run_config`` (relative to the current directory), else
        ``workdir/runs/run-<timestamp>``. ``flwr run`` exits 0 even when the ServerApp fails, so success is
        the app's own "finished" line in the stream plus a ``results.json``; otherwise RuntimeError with the log.
        """
        match = re.search(r"(?:^|\s)run-dir=('[^']*'|\"[^\"]*\"|\S+)", run_config)  # flwr's key=value syntax
        given = match[1].strip("'\"") if match else None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(run_dir or given or self.workdir / "runs" / f"run-{stamp}").expanduser().resolve()
        log_path = self.logs / f"flwr-run-{stamp}.log"
        command = [str(self.bin / "flwr"), "run", str(self.app), CONNECTION, "--stream",
                   "--run-config", DEPLOYMENT_RUN_CONFIG]
        command += ["--run-config", run_config] if run_config else []
        command += ["--run-config", f"run-dir={json.dumps(str(run_dir))}"]
        self.echo(f"deploy: flwr run {self.app.name} {CONNECTION} -> {run_dir} (log {log_path})")
        lines = []
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, env=self.env, cwd=self.workdir, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            self.processes.append(proc)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            try:
                for line in proc.stdout:
                    log.write(line)
                    lines.append(line)
                    self.echo(line.rstrip("\n"))
                proc.wait()
            finally:
                if timer:
                    timer.cancel()
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                self.processes.remove(proc)
        output = "".join(lines)
        if FINISHED not in output or not RunDir(run_dir).results.is_file():
            reason = f"timed out after {timeout:g}s" if timeout and proc.returncode == -9 else "did not finish"
            raise RuntimeError(f"the run {reason} (flwr exit code {proc.returncode}); log {log_path}, "
                               f"SuperLink log {self.logs / 'superlink.log'}:\n{output[-3000:]}")
        return run_dir

    def submit_command(self) -> str:
        """The shell command that submits a run to this federation from another terminal."""
        return (f"FLWR_HOME={self.flwr_home} {self.bin / 'flwr'} run {self.app} {CONNECTION} --stream "
                f"--run-config \"{DEPLOYMENT_RUN_CONFIG} run-dir='{self.workdir / 'runs' / 'my-run'}'\"")

    # --- helpers -----------------------------------------------------------------------------------------------
    def echo(self, line: str) -> None:
        """Progress on stdout, flushed at once so it shows through pipes (tee, a test reading the output)."""
        if self.echo_output:
            print(line, flush=True)

    def _write_connection(self) -> None:
        """The SuperLink connection in the private FLWR_HOME (flwr 1.41 reads connections from config.toml)."""
        lines = ["[superlink]", f"default = {json.dumps(CONNECTION)}", "", f"[superlink.{CONNECTION}]",
                 f"address = {json.dumps(self.address)}"]
        lines.append(f"root-certificates = {json.dumps(str(self.certificates['ca']))}" if self.tls
                     else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, tool: str, args: list[str]) -> None:
        with (self.logs / f"{name}.log").open("w") as log:
            self.processes.append(subprocess.Popen([str(self.bin / tool), *args], env=self.env, cwd=self.workdir,
                                                   stdout=log, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL))

    def _flwr(self, args: list[str]) -> str:
        done = subprocess.run([str(self.bin / "flwr"), *args], env=self.env, cwd=self.workdir,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"`flwr {' '.join(args)}` failed ({done.returncode}): {done.stdout}{done.stderr}")
        return done.stdout

    def _online(self) -> int | None:
        """Online SuperNodes as the SuperLink reports them; None while it does not answer."""
        done = subprocess.run([str(self.bin / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
                              env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=60)
        try:
            nodes = json.loads(done.stdout[done.stdout.index("{"):])["nodes"]
        except (ValueError, KeyError):
            return None
        return sum(node["status"] == "online" for node in nodes)

    def _wait_for_nodes(self, count: int, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for popen, name in zip(self.processes, self._names(), strict=True):
                if popen.poll() is not None:
                    log = self.logs / f"{name}.log"
                    raise RuntimeError(f"{name} exited with code {popen.returncode} while waiting for {what}; "
                                       f"log {log}:\n{log.read_text()[-3000:]}")
            online = self._online()
            if online is not None and online >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {self.startup_timeout:g}s waiting for {what} "
                                   f"({online or 0} online); logs in {self.logs}")
            time.sleep(1)

    def _names(self) -> list[str]:
        return ["superlink"] + [f"supernode-{i}" for i in range(len(self.processes) - 1)]
