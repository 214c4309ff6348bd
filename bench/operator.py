"""The operator benchmark `make bench` runs: `--mailboxes` Mailbox resources applied to the emulated
Kubernetes API, and how long `mailfleet operator` takes to serve them all.

The API is kmock's emulator as the operator's tests use it (`tests.operator.emulator.ApiServer`, in this
process, over real HTTP on 127.0.0.1); the operator is `mailfleet operator --namespace mail`, a process
of its own logging in with a kubeconfig, as a user would run it outside a cluster. One MailDomain
(example.com) is created and reconciled first, with `--replicas` nodes (one run for each number, "1,3"
by default: on three, each mailbox's home is recorded in the directory and named in its status.node);
then each Mailbox is applied with its own password Secret, `--concurrency` requests at a time. The
Secrets hold argon2id hashes, which the operator uses as they are (made here with cheap argon2
parameters, so that making ten thousand takes a second; the hash strings have the usual lengths). A
last, smaller run (`--plaintext`) puts plaintext in the Secrets, so the operator hashes every password
itself with argon2's default parameters: its hashing throughput.

Measured from the first Mailbox applied: until the directory Secret (gzip-compressed YAML above 256 KiB)
holds every address, and until every Mailbox's status says Ready=True (reason Served); also the writes
to the directory Secret, the operator's reconciles (from its /metrics), its peak memory (VmHWM), its CPU
time, the directory's size against the 1 MiB a Secret may hold, the homes by ordinal, the API requests by
client and the load average. The runs are then shown side by side with issue 14's goals. It is a problem
when a Ready Mailbox names no home in status.node, or another than the directory records, or when the
homes are not spread over every ordinal.
There is no Postfix or Dovecot equivalent for this one. Everything lives in one temporary directory,
removed at the end; the operator is stopped with SIGTERM and must exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import dataclasses
import importlib.metadata
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import argon2
import kmock
import kopf
import yaml

from bench import common
from bench.common import HOST, START_TIMEOUT, BenchError
from mailfleet import k8s, specs
from tests.operator.emulator import RESOURCES, ApiServer

NAMESPACE = "mail"
DOMAIN_NAME = "example-com"  # the MailDomain
MAIL_DOMAIN = "example.com"
DIRECTORY = f"{DOMAIN_NAME}-directory"
DIRECTORY_KEY = "directory.yaml"
SECRET_LIMIT = 1024 * 1024  # bytes of data a Secret may hold
OPERATOR_TOKEN, BENCH_TOKEN = "operator", "bench"  # tell the two clients apart in the emulator's counts
POLL = 0.2  # seconds between looks at the emulator's write log
REFETCH = 2.0  # seconds between fetches of the directory when no write was seen (a write may land late)
SETTLE_TIMEOUT = 60.0  # seconds for the operator's queue to drain once everything is served
STOP_TIMEOUT = 30.0  # seconds for the operator to exit after SIGTERM (a pod's grace period)
# The goals of issue 14 for 10,000 Mailboxes on a three-node domain, shown next to the figures (missing one
# is reported, not a failure: the figures depend on the machine).
GOAL_AFTER_APPLY = 20.0  # seconds from the last Mailbox applied until the directory holds them all
GOAL_PEAK_MIB = 200  # the operator's peak memory

MAILDOMAIN = k8s.kind_of("mailfleet.io/v1alpha1", "MailDomain")
MAILBOX = k8s.kind_of("mailfleet.io/v1alpha1", "Mailbox")
SECRET = k8s.kind_of("v1", "Secret")

# Cheap parameters for the hashes made here (the operator takes any argon2 hash as it is); salt and hash
# lengths are the defaults, so the directory is as large as with real hashes.
CHEAP_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@dataclasses.dataclass(frozen=True)
class Load:
    mailboxes: int
    replicas: int  # the MailDomain's nodes (spec.replicas): above one, the mailboxes are spread over them
    plaintext: bool  # Secrets hold plaintext (the operator hashes) instead of argon2id hashes
    concurrency: int
    timeout: float


@dataclasses.dataclass
class Result:
    load: Load
    apply_seconds: float | None = None  # the first Mailbox applied until the last one was
    directory_seconds: float | None = None  # ... until the directory Secret held every address
    ready_seconds: float | None = None  # ... until every Mailbox had Ready=True (Served)
    directory_writes: int = 0  # writes to the directory Secret after the first Mailbox
    directory_bytes: int = 0  # the Secret's data (gzip when compressed)
    directory_yaml_bytes: int = 0  # the YAML inside
    homes: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)  # entries by home
    compressed: bool = False
    peak_kib: int = 0  # the operator's VmHWM
    rest_kib: int = 0  # its VmRSS once the empty domain was reconciled, before the load
    operator_cpu: float = 0.0  # its user + system CPU seconds during the load
    bench_cpu: float = 0.0  # this process's (emulator and client) during the load
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    requests: collections.Counter[tuple[str, str]] = dataclasses.field(default_factory=collections.Counter)
    exit_code: int | None = None
    load_average: str = ""  # the machine's, once every Mailbox was served
    problems: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# The emulated API server


class CountingApiServer(ApiServer):
    """The tests' emulator, also counting the requests it serves by client (bench or operator) and kind
    of request (`verb plural[/subresource]`)."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.action is not None:
            token = str(request.headers.get("Authorization", "")).removeprefix("Bearer ")
            what = str(request.resource.plural or request.url.path)
            what += f"/{request.subresource}" if request.subresource else ""
            self.served[(token, f"{request.action.name.lower()} {what}")] += 1
        return await super()._handle(request)


@contextlib.asynccontextmanager
async def emulator() -> AsyncIterator[CountingApiServer]:
    """The emulator on a free port of 127.0.0.1, as kmock's pytest fixture starts it, with the resources
    the operator uses."""
    async with CountingApiServer() as api, kmock.Server(api):
        for name, info in RESOURCES.items():
            api.resources[name] = info
        yield api


def write_kubeconfig(path: Path, server: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "operator", "user": {"token": OPERATOR_TOKEN}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "operator", "namespace": NAMESPACE}}],
        "current-context": "kmock",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# The objects


def maildomain(replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "MailDomain",
        "metadata": {"name": DOMAIN_NAME, "namespace": NAMESPACE},
        "spec": {"domain": MAIL_DOMAIN, "replicas": replicas, "dkim": {"selector": "mail"}},
    }


def mailbox_name(index: int) -> str:
    return f"user{index:05d}"


def address(index: int) -> str:
    return f"{mailbox_name(index)}@{MAIL_DOMAIN}"


def password_secret(index: int, value: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"{mailbox_name(index)}-password", "namespace": NAMESPACE},
        "type": "Opaque",
        "data": {"password": base64.b64encode(value.encode()).decode()},
    }


def mailbox(index: int) -> dict[str, Any]:
    return {
        "apiVersion": "mailfleet.io/v1alpha1",
        "kind": "Mailbox",
        "metadata": {"name": mailbox_name(index), "namespace": NAMESPACE},
        "spec": {
            "address": address(index),
            "displayName": f"User {index:05d}",
            "passwordSecretRef": {"name": f"{mailbox_name(index)}-password"},
        },
    }


def passwords(count: int, *, plaintext: bool) -> list[str]:
    """What each Mailbox's Secret holds: a random password, or its argon2id hash."""
    values = [secrets.token_urlsafe(12) for _ in range(count)]
    return values if plaintext else [CHEAP_HASHER.hash(value) for value in values]


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for found in (obj.get("status") or {}).get("conditions") or []:
        if found.get("type") == type_:
            return dict(found)
    return {}


def directory_content(secret: dict[str, Any]) -> tuple[bytes, bytes]:
    """The directory Secret's data and the YAML in it (the data is gzip above 256 KiB)."""
    data = k8s.secret_values(secret).get(DIRECTORY_KEY, b"")
    return data, specs.node.directory_text(data)


def directory_homes(data: bytes) -> dict[str, int]:
    """address -> home ordinal of the directory Secret's data (a missing home is ordinal 0)."""
    return specs.node.recorded_homes(specs.node.read_directory(data))


def directory_count(text: bytes) -> int:
    """How many entries the directory has, without parsing its YAML (a fraction of a second at 10,000
    entries, which this process's core, the emulator's, can use better): its lines."""
    return len(ENTRY_LINE.findall(text))


ENTRY_LINE = re.compile(rb"^- ", re.MULTILINE)  # one mailbox a line (specs.node.directory_content)


# ---------------------------------------------------------------------------------------------------
# The operator process


@dataclasses.dataclass
class Operator:
    proc: asyncio.subprocess.Process  # in a session of its own
    log_file: Path
    metrics_port: int

    def died(self) -> str | None:
        if self.proc.returncode is None:
            return None
        return f"mailfleet operator exited with code {self.proc.returncode}; its log ends with:\n{self.tail()}"

    def tail(self) -> str:
        return common.tail(self.log_file)

    def status_kib(self, field: str) -> int:
        """A VmXXX line of /proc/<pid>/status, in KiB (0 when the process is gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (fields 14 and 15 of /proc/<pid>/stat, after the command name)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    async def metrics(self) -> dict[str, float]:
        """Its /metrics, as `name{labels}` -> value."""
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            text = await response.text()
        found: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                found[name] = float(value)
        return found

    async def stop(self) -> int | None:
        """SIGTERM, then wait (the emulator it may still talk to keeps running meanwhile); its exit code,
        or None when it had to be killed."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        code = self.proc.returncode
        if code is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        return code

    def errors(self) -> list[str]:
        """Lines kopf logged at level ERROR or worse (its format: `[time] logger [LEVEL] message`)."""
        return [line for line in common.log_lines(self.log_file) if re.search(r"\[(ERROR|CRITICAL)\s*\]", line)]


async def start_operator(workdir: Path, kubeconfig: Path) -> Operator:
    (metrics_port,) = common.free_ports(1)
    log_file = workdir / "operator.log"
    # No mail node runs here: the operator is not to ask one for usage (it would only wait for DNS).
    argv = ["-m", "mailfleet.cli", "operator", "--namespace", NAMESPACE, "--metrics-port", str(metrics_port)]
    argv += ["--usage-interval", "0"]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    with log_file.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )  # fmt: skip
    return Operator(proc, log_file, metrics_port)


# ---------------------------------------------------------------------------------------------------
# One run


async def wait_until(what: str, probe: Callable[[], Awaitable[bool]], *, seconds: float, operator: Operator) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if (died := operator.died()) is not None:
            raise BenchError(f"{what}: {died}")
        if await probe():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not after {seconds:.0f} s; the operator's log ends with:\n{operator.tail()}")
        await asyncio.sleep(POLL)


async def apply_all(client: k8s.Client, values: list[str], *, concurrency: int) -> None:
    """Each Mailbox after its password Secret, `concurrency` of them at a time."""
    indexes: Iterator[int] = iter(range(len(values)))

    async def worker() -> None:
        for index in indexes:
            await client.create(password_secret(index, values[index]))
            await client.create(mailbox(index))

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(worker())


class Watcher:
    """Follows the run through the emulator's write log: fetches the directory when it was written (or
    every REFETCH seconds), lists the Mailboxes once every one of them had a status written."""

    def __init__(self, api: ApiServer, client: k8s.Client, result: Result, *, started: float) -> None:
        self.api, self.client, self.result, self.started = api, client, result, started
        self.expected = {address(i) for i in range(result.load.mailboxes)}
        self.names = {mailbox_name(i) for i in range(result.load.mailboxes)}
        self.seen = len(api.writes)
        self.status_written: set[str] = set()
        self.fetched_writes, self.fetched_at, self.fetched_version = -1, 0.0, ""
        self.listed_at = 0.0
        self.shown = -1
        self.homes: dict[str, int] = {}  # the complete directory's address -> home
        self.nodes: dict[str, str | None] = {}  # Mailbox name -> status.node, once every one was Ready

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _read_writes(self) -> None:
        writes = self.api.writes
        for _, plural, name, subresource in writes[self.seen :]:
            if plural == "secrets" and name == DIRECTORY and subresource is None:
                self.result.directory_writes += 1
            elif plural == "mailboxes" and subresource == "status" and name is not None:
                self.status_written.add(name)
        self.seen = len(writes)

    async def _check_directory(self) -> None:
        now = time.monotonic()
        if self.result.directory_writes == self.fetched_writes and now - self.fetched_at < REFETCH:
            return
        self.fetched_writes, self.fetched_at = self.result.directory_writes, now
        secret = await self.client.get(SECRET, NAMESPACE, DIRECTORY)
        at = self.elapsed()
        if secret is None or (version := str(secret["metadata"].get("resourceVersion"))) == self.fetched_version:
            return
        self.fetched_version = version
        self._read_writes()  # the write that made this version, when it landed after the last look
        data, text = directory_content(secret)
        entries = directory_count(text)
        if entries != self.shown:
            self.shown = entries
            form = "gzip" if data.startswith(specs.node.GZIP_MAGIC) else "YAML"
            print(
                f"  {self.elapsed():7.1f} s  directory: {entries:>6} of {len(self.expected)} mailboxes, "
                f"{len(data) / 1024:.0f} KiB {form} (write {self.result.directory_writes})",
                flush=True,
            )
        if entries < len(self.expected):
            return
        homes = directory_homes(data)
        if (held := set(homes)) >= self.expected:
            self.result.directory_seconds = at
            self.result.directory_bytes, self.result.directory_yaml_bytes = len(data), len(text)
            self.result.compressed = data.startswith(specs.node.GZIP_MAGIC)
            self.homes = homes
            self.result.homes = collections.Counter(homes.values())
            if extra := held - self.expected:
                self.result.problems.append(f"the directory holds {len(extra)} addresses never applied")

    async def _check_ready(self) -> None:
        now = time.monotonic()
        if len(self.status_written & self.names) < len(self.names) or now - self.listed_at < REFETCH:
            return
        self.listed_at = now
        ready, listed = 0, await self.client.list(MAILBOX, NAMESPACE)
        at = self.elapsed()
        for obj in listed:
            found = condition(obj, "Ready")
            ready += found.get("status") == "True" and found.get("reason") == "Served"
        print(f"  {at:7.1f} s  statuses: {ready} of {len(self.names)} Mailboxes Ready (Served)", flush=True)
        if ready == len(self.names):
            self.result.ready_seconds = at
            self.nodes = {str(obj["metadata"]["name"]): (obj.get("status") or {}).get("node") for obj in listed}

    def check_placement(self) -> None:
        """Every served Mailbox names its home in status.node (the StatefulSet's pod `<name>-<ordinal>`), the
        one the directory records for its address; the homes are spread over every ordinal of the domain
        (rendezvous hashing: each holds about 1/replicas of them)."""
        if not self.homes or not self.nodes:
            return
        replicas, problems = self.result.load.replicas, self.result.problems
        unset = [name for name, node in self.nodes.items() if not node]
        if unset:
            problems.append(f"{len(unset)} Ready Mailboxes have no status.node (e.g. {', '.join(sorted(unset)[:3])})")
        elsewhere = [
            name
            for name, node in self.nodes.items()
            if node and node.rpartition("-")[2] != str(self.homes.get(f"{name}@{MAIL_DOMAIN}"))
        ]
        if elsewhere:
            problems.append(
                f"{len(elsewhere)} Mailboxes' status.node is not the home their directory entry records "
                f"(e.g. {', '.join(sorted(elsewhere)[:3])})"
            )
        homes = self.result.homes
        if outside := sorted(set(homes) - set(range(replicas))):
            problems.append(f"the directory records homes {outside}, not ordinals of a {replicas}-node domain")
        fair = len(self.homes) / replicas
        if thin := [ordinal for ordinal in range(replicas) if homes[ordinal] < fair / 2]:
            spread = ", ".join(f"{ordinal}: {homes[ordinal]}" for ordinal in range(replicas))
            problems.append(f"the homes are not spread over the {replicas} ordinals ({spread}); {thin} hold too few")

    async def follow(self, operator: Operator) -> None:
        """Until the directory holds every address and every Mailbox is Ready, or the timeout."""
        deadline = self.started + self.result.load.timeout
        while self.result.directory_seconds is None or self.result.ready_seconds is None:
            if (died := operator.died()) is not None:
                raise BenchError(died)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"not served after {self.result.load.timeout:.0f} s: the directory holds {max(self.shown, 0)} of "
                    f"{len(self.expected)} addresses, {len(self.status_written)} Mailboxes had a status written; "
                    f"the operator's log ends with:\n{operator.tail()}"
                )
            self._read_writes()
            if self.result.directory_seconds is None:
                await self._check_directory()
            if self.result.ready_seconds is None:
                await self._check_ready()
            await asyncio.sleep(POLL)
        self._read_writes()
        self.check_placement()


async def settle(operator: Operator) -> dict[str, float]:
    """The operator's metrics once its work queue stayed empty for a second (the last directory write
    brings one more reconcile, which finds nothing to do)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    quiet = 0
    while True:
        metrics = await operator.metrics()
        quiet = quiet + 1 if metrics.get("mailfleet_operator_queue_depth", 0.0) == 0 else 0
        if quiet >= 3 or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(0.5)


async def bench(workdir: Path, load: Load, values: list[str]) -> Result:
    """One run in `workdir`: a new emulator and operator, the Mailboxes with these password values."""
    result = Result(load)
    async with emulator() as api:
        server = str(api.url).rstrip("/")
        kubeconfig = workdir / "kubeconfig"
        write_kubeconfig(kubeconfig, server)
        operator = await start_operator(workdir, kubeconfig)
        info = kopf.ConnectionInfo(server=server, token=BENCH_TOKEN)
        try:
            async with k8s.Client(info, timeout=300) as client:
                await client.create(maildomain(load.replicas))

                async def reconciled() -> bool:
                    domain = await client.get(MAILDOMAIN, NAMESPACE, DOMAIN_NAME)
                    return domain is not None and condition(domain, "Degraded").get("status") == "False"

                await wait_until("the MailDomain reconciled", reconciled, seconds=START_TIMEOUT, operator=operator)
                result.rest_kib = operator.status_kib("VmRSS")
                print(f"operator ready, the empty domain reconciled ({result.rest_kib / 1024:.0f} MiB); applying")
                cpu_before, bench_before = operator.cpu_seconds(), time.process_time()
                start = time.monotonic()
                watcher = Watcher(api, client, result, started=start)
                following = asyncio.create_task(watcher.follow(operator))
                try:
                    await apply_all(client, values, concurrency=load.concurrency)
                    result.apply_seconds = time.monotonic() - start
                    print(f"  {result.apply_seconds:7.1f} s  applied {load.mailboxes} Mailboxes and Secrets")
                    await following
                finally:
                    following.cancel()
                result.load_average = load_average()
                result.operator_cpu = operator.cpu_seconds() - cpu_before
                result.bench_cpu = time.process_time() - bench_before
                result.metrics = await settle(operator)
                watcher._read_writes()
                result.peak_kib = operator.status_kib("VmHWM")
        except BenchError as error:
            result.problems.append(str(error))
        except (k8s.ApiError, aiohttp.ClientError, TimeoutError) as error:
            result.problems.append(f"API request failed: {error!r}")
        finally:
            result.exit_code = await operator.stop()
            result.requests = api.served
        if result.exit_code != 0:
            shown = "killed after no exit" if result.exit_code is None else f"exit code {result.exit_code}"
            result.problems.append(f"mailfleet operator after SIGTERM: {shown}; its log ends with:\n{operator.tail()}")
        if errors := operator.errors():
            lines = "\n".join(f"    {line}" for line in errors[:5])
            result.problems.append(f"the operator logged {len(errors)} errors, the first ones:\n{lines}")
    return result


# ---------------------------------------------------------------------------------------------------
# The report


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def per_second(count: float, value: float | None) -> str:
    return f"{count / value:.0f}/s" if value else "-"


def metric_sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(value for name, value in metrics.items() if name.startswith(prefix))


def by_label(metrics: dict[str, float], prefix: str, label: str) -> list[tuple[str, float]]:
    """(label value, value) of the non-zero samples of one metric."""
    found = []
    for name, value in sorted(metrics.items()):
        if name.startswith(prefix) and value and (match := re.search(rf'{label}="([^"]*)"', name)):
            found.append((match.group(1), value))
    return found


def after_apply(result: Result, at: float | None) -> float | None:
    """Seconds from the last Mailbox applied until `at` (seconds from the first)."""
    return None if at is None or result.apply_seconds is None else max(at - result.apply_seconds, 0.0)


def describe(load: Load) -> str:
    label = "plaintext (the operator hashes)" if load.plaintext else "argon2id hashes"
    nodes = "1 node" if load.replicas == 1 else f"{load.replicas} nodes"
    return f"{load.mailboxes} Mailboxes on a domain of {nodes} (replicas: {load.replicas}), Secrets holding {label}"


def report(result: Result) -> None:
    load, metrics = result.load, result.metrics
    n = load.mailboxes
    print()
    print(describe(load))
    rows: list[tuple[str, str, str]] = [
        ("applied (Secret + Mailbox each)", seconds(result.apply_seconds), per_second(n, result.apply_seconds)),
        ("directory holds every address", seconds(result.directory_seconds), per_second(n, result.directory_seconds)),
        ("every Mailbox Ready (Served)", seconds(result.ready_seconds), per_second(n, result.ready_seconds)),
    ]
    print(f"  {'from the first Mailbox applied until':<36} {'seconds':>9} {'mailboxes':>10}")
    for name, shown, rate in rows:
        print(f"  {name:<36} {shown:>9} {rate:>10}")
    print(
        f"  from the last Mailbox applied until the directory held every address "
        f"{seconds(after_apply(result, result.directory_seconds))}, every Mailbox was Ready "
        f"{seconds(after_apply(result, result.ready_seconds))}"
    )
    if result.homes:
        spread = ", ".join(f"{ordinal}: {count}" for ordinal, count in sorted(result.homes.items()))
        print(f"  the directory's homes by ordinal: {spread}")
    reconciles = metric_sum(metrics, "mailfleet_operator_reconciles_total")
    results = ", ".join(
        f"{result} {value:.0f}" for result, value in by_label(metrics, "mailfleet_operator_reconciles_total", "result")
    )
    total = metric_sum(metrics, "mailfleet_operator_reconcile_duration_seconds_sum")
    count = metric_sum(metrics, "mailfleet_operator_reconcile_duration_seconds_count")
    mean = f", {total / count:.2f} s each on average, {total:.1f} s in all" if count else ""
    print(f"  reconciles of the MailDomain: {reconciles:.0f} ({results or 'none'}){mean}")
    print(f"  writes to the directory Secret after the first Mailbox: {result.directory_writes}")
    status_writes = result.requests[(OPERATOR_TOKEN, "update mailboxes/status")]
    events = result.requests[(OPERATOR_TOKEN, "create events")]
    print(f"  Mailbox status writes: {status_writes} ({status_writes / n:.2f} a Mailbox); Events posted: {events}")
    if result.directory_bytes:
        form = f"gzip of {result.directory_yaml_bytes / 1024:.0f} KiB YAML" if result.compressed else "YAML"
        share = result.directory_bytes / SECRET_LIMIT
        fits = SECRET_LIMIT * n // result.directory_bytes
        print(
            f"  directory Secret: {result.directory_bytes / 1024:.0f} KiB ({form}), {share:.0%} of the 1 MiB a "
            f"Secret holds ({result.directory_bytes / n:.0f} bytes a mailbox: about {fits} would fit)"
        )
    hashed = metric_sum(metrics, "mailfleet_operator_passwords_hashed_total")
    if load.plaintext or hashed:
        rate = per_second(hashed, result.directory_seconds).removesuffix("/s")
        print(
            f"  passwords hashed by the operator (argon2id, default parameters): {hashed:.0f}, "
            f"{rate} a second until the directory was complete"
        )
    print(
        f"  operator memory: peak {result.peak_kib / 1024:.0f} MiB (VmHWM), {result.rest_kib / 1024:.0f} MiB "
        "before the load (VmRSS)"
    )
    wall = result.ready_seconds or result.directory_seconds
    busy = f" over {wall:.1f} s" if wall else ""
    print(
        f"  CPU{busy}: operator {result.operator_cpu:.1f} s, this process (emulated API and client) "
        f"{result.bench_cpu:.1f} s; load average {result.load_average or '-'}"
    )
    for token, who in ((BENCH_TOKEN, "bench"), (OPERATOR_TOKEN, "operator")):
        counts = sorted(((c, w) for (t, w), c in result.requests.items() if t == token), reverse=True)
        shown = ", ".join(f"{what} {c}" for c, what in counts[:8])
        print(f"  API requests by the {who}: {sum(c for c, _ in counts)} ({shown})")
    code = "-" if result.exit_code is None else str(result.exit_code)
    print(f"  operator exit code after SIGTERM: {code}")


# ---------------------------------------------------------------------------------------------------
# The command


def summary(results: list[Result]) -> None:
    """The runs with argon2id hashes side by side (one column per number of nodes), with the goals."""
    shown = [result for result in results if not result.load.plaintext]
    if not shown:
        return

    def goal(value: float | None, limit: float) -> str:
        return "" if value is None else (" (met)" if value <= limit else " (missed)")

    columns = [f"replicas: {result.load.replicas}" for result in shown]
    rows: list[tuple[str, list[str], str]] = [
        ("directory complete, after the last apply", [
            seconds(after_apply(r, r.directory_seconds)) + goal(after_apply(r, r.directory_seconds), GOAL_AFTER_APPLY)
            for r in shown
        ], f"<= {GOAL_AFTER_APPLY:.0f} s"),
        ("every Mailbox Ready, after the last apply", [
            seconds(after_apply(r, r.ready_seconds)) for r in shown
        ], ""),
        ("operator peak memory (VmHWM)", [
            f"{r.peak_kib / 1024:.0f} MiB" + goal(r.peak_kib / 1024 if r.peak_kib else None, GOAL_PEAK_MIB)
            for r in shown
        ], f"<= {GOAL_PEAK_MIB} MiB"),
        ("directory Secret", [
            f"{r.directory_bytes / 1024:.0f} KiB" if r.directory_bytes else "-" for r in shown
        ], f"<= {SECRET_LIMIT // 1024} KiB"),
        ("homes by ordinal", [
            "/".join(str(r.homes[o]) for o in range(r.load.replicas)) if r.homes else "-" for r in shown
        ], ""),
    ]  # fmt: skip
    width = max(len(c) for c in columns + [value for _, values, _ in rows for value in values]) + 2
    print(f"\n{shown[0].load.mailboxes} Mailboxes (argon2id hashes), by the MailDomain's number of nodes")
    print(f"  {'':<42}" + "".join(f"{c:>{width}}" for c in columns) + f"  {'goal'}")
    for name, values, limit in rows:
        print(f"  {name:<42}" + "".join(f"{v:>{width}}" for v in values) + f"  {limit}".rstrip())


def replica_counts(text: str) -> list[int]:
    """`--replicas`: positive numbers separated by commas ("1,3")."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"not positive numbers separated by commas: {text!r}")
    return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator",
        description="Mailboxes applied to kmock's emulated Kubernetes API: how long `mailfleet operator` takes "
        "to put them all in the directory Secret and mark them Ready, and its peak memory.",
        epilog="Defaults come from BENCH_OPERATOR_MAILBOXES, BENCH_OPERATOR_REPLICAS, BENCH_OPERATOR_PLAINTEXT, "
        "BENCH_OPERATOR_CONCURRENCY and BENCH_OPERATOR_TIMEOUT when set.",
    )
    parser.add_argument(
        "--mailboxes", type=common.non_negative, default=common.env_default("BENCH_OPERATOR_MAILBOXES", "10000"),
        help="Mailboxes whose Secrets hold argon2id hashes; 0: skip this run (10000)",
    )  # fmt: skip
    parser.add_argument(
        "--replicas", type=replica_counts, default=common.env_default("BENCH_OPERATOR_REPLICAS", "1,3"),
        help="the MailDomain's nodes: one run of --mailboxes for each number, shown side by side (1,3)",
    )  # fmt: skip
    parser.add_argument(
        "--plaintext", type=common.non_negative, metavar="N",
        default=common.env_default("BENCH_OPERATOR_PLAINTEXT", "200"),
        help="Mailboxes of a last run whose Secrets hold plaintext, hashed by the operator (on a domain of the "
        "first --replicas); 0: skip it (200)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=common.positive, default=common.env_default("BENCH_OPERATOR_CONCURRENCY", "16"),
        help="requests in flight while applying (16)",
    )  # fmt: skip
    parser.add_argument(
        "--timeout", type=common.positive, default=common.env_default("BENCH_OPERATOR_TIMEOUT", "1800"),
        help="seconds each run may take from the first Mailbox applied until all are served (1800)",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (the operator's logs)")
    return parser.parse_args(argv)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: the machine may be shared, and the figures depend on it."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("kopf", "kmock"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = {"concurrency": args.concurrency, "timeout": args.timeout}
    runs = [Load(args.mailboxes, replicas, plaintext=False, **options) for replicas in args.replicas]
    runs.append(Load(args.plaintext, args.replicas[0], plaintext=True, **options))
    runs = [load for load in runs if load.mailboxes]
    print("operator: Mailboxes applied to the emulated Kubernetes API (kmock) and served by `mailfleet operator`")
    print("no Postfix/Dovecot equivalent: a mail server has no operator; the figures stand alone")
    results: list[Result] = []
    with common.temporary_workdir("mailfleet-bench-operator-", keep=args.keep) as workdir:
        common.print_machine(workdir, versions())
        try:
            with common.signals_raise():
                for number, load in enumerate(runs):
                    run_dir = workdir / f"run{number}"
                    run_dir.mkdir()
                    started = time.monotonic()
                    values = passwords(load.mailboxes, plaintext=load.plaintext)
                    print(
                        f"\n{describe(load)} (made in {time.monotonic() - started:.1f} s), "
                        f"{load.concurrency} requests at a time; load average {load_average()}",
                        flush=True,
                    )
                    results.append(asyncio.run(bench(run_dir, load, values)))
        except KeyboardInterrupt as interrupt:
            return common.interrupted(interrupt)
    for result in results:
        report(result)
    summary(results)
    print(f"load average at the end: {load_average()} (the other processes of this machine share its cores)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nthis process (emulated API, client): peak {peak / 1024:.0f} MiB")
    return common.outcome([problem for result in results for problem in result.problems])


if __name__ == "__main__":
    sys.exit(main())
