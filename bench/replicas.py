"""`uv run --group bench python -m bench.replicas`: three `switchboard serve` replicas behind deploy/nginx.conf,
one of them stopped (SIGTERM) while orders flow through nginx's single port.

Starts an embedded PostgreSQL in a temporary folder (or uses DATABASE_URL's server: a fresh
database `bench_replicas` on it, dropped at the end), migrates it, starts 3 replicas on free ports
(all modules, one database), renders deploy/nginx.conf for their ports and runs nginx on it
(installed with apt-get when missing and running as root). Checks the config's retry policy
with a fake replica that drops a POST it received (502 without Idempotency-Key, retried with
one). Through nginx: adds stock, places
orders (bounded concurrency, `pm_card_ok` and `pm_card_declined`, each with an Idempotency-Key
unless --no-idempotency-key), SIGTERMs one replica once a share of them was answered, and waits
until every accepted order is paid or declined in `orders_view`. Prints one JSON line (stdout;
progress goes to stderr) and exits 0 only if the retry policy held, every order got 201, all 3
replicas served orders
before the SIGTERM, the stopped replica exited cleanly and deregistered, and every order settled
with the status its card implies and no duplicates. bench/README.md ("Replicas behind nginx").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg

from bench import env
from bench.loadgen import raise_nofile

ROOT = env.ROOT
TEMPLATE = ROOT / "deploy" / "nginx.conf"
DATABASE = "bench_replicas"
REPLICAS = 3
PLACE_ORDER_OK = re.compile(
    r'^switchboard_mediator_calls_total\{(?=[^}]*message="PlaceOrder")(?=[^}]*outcome="ok")[^}]*\}\s+(\S+)$',
    re.MULTILINE,
)
CHECK_CUSTOMER = "retry-policy-check"  # the retry-policy check's order: not part of the load
FINAL = {"pm_card_ok": "paid", "pm_card_declined": "payment_declined"}


def say(message: str) -> None:
    print(f"bench.replicas: {message}", file=sys.stderr, flush=True)


# -- nginx -----------------------------------------------------------------------------------------


def find_nginx() -> str:
    """nginx on PATH or in /usr/sbin; installed with apt-get when missing and running as root."""

    def look() -> str | None:
        found = shutil.which("nginx")
        if found:
            return found
        return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None

    found = look()
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit(
            "bench.replicas: nginx not found (not on PATH, not /usr/sbin/nginx) and not running as root: "
            "install it (e.g. `sudo apt-get install nginx`) and run again"
        )
    if shutil.which("apt-get") is None:
        raise SystemExit(
            "bench.replicas: nginx not found and there is no apt-get to install it: install nginx"
        )
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    say("nginx not found: installing it with `apt-get install -y nginx`")
    install = ["apt-get", "install", "-y", "nginx"]
    done = subprocess.run(install, env=apt_env, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0:
        say("apt-get install failed: running `apt-get update` and trying once more")
        subprocess.run(["apt-get", "update"], env=apt_env, stdout=sys.stderr, stderr=sys.stderr)
        done = subprocess.run(install, env=apt_env, stdout=sys.stderr, stderr=sys.stderr)
    found = look()
    if done.returncode != 0 or found is None:
        raise SystemExit(
            f"bench.replicas: could not install nginx (`apt-get install -y nginx` exited {done.returncode}): "
            "install it by hand and run again"
        )
    say(f"installed nginx: {found}")
    return found


def render_conf(template: str, listen_port: int, ports: list[int]) -> str:
    """deploy/nginx.conf with one upstream `server 127.0.0.1:P …` line per port (the first line's
    options on each) and `listen 127.0.0.1:P` pointed at these ports; everything else as it is."""
    found = re.findall(r"^(\s*server\s+)127\.0\.0\.1:\d+(.*)$", template, flags=re.MULTILINE)
    if not found:
        raise SystemExit(f"bench.replicas: {TEMPLATE} has no upstream `server 127.0.0.1:…` line")
    head, options = found[0]
    block = "".join(f"{head}127.0.0.1:{port}{options}\n" for port in ports)
    seen: list[int] = []

    def upstream(match: re.Match) -> str:
        seen.append(1)
        return block if len(seen) == 1 else ""  # the template's lines become this one block

    text = re.sub(r"^\s*server\s+127\.0\.0\.1:\d+.*\n", upstream, template, flags=re.MULTILINE)
    text, listens = re.subn(
        r"^(\s*listen\s+)127\.0\.0\.1:\d+", rf"\g<1>127.0.0.1:{listen_port}", text, flags=re.MULTILINE
    )
    if listens != 1:
        raise SystemExit(f"bench.replicas: {TEMPLATE} has {listens} `listen 127.0.0.1:…` lines, expected 1")
    return text


class Nginx:
    def __init__(self, binary: str, prefix: Path, conf: Path) -> None:
        self.binary = binary
        self.prefix = prefix
        self.conf = conf
        self.proc: subprocess.Popen | None = None
        self.output = prefix / "logs" / "nginx.out"

    def command(self, *extra: str) -> list[str]:
        return [self.binary, "-c", str(self.conf), "-p", f"{self.prefix}/", *extra]

    def check(self) -> None:
        done = subprocess.run(self.command("-t"), capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench.replicas: nginx -t failed for {self.conf}:\n{done.stderr}")

    def start(self) -> None:
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command("-g", "daemon off;"),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 10.0) -> int | None:
        """SIGQUIT: graceful (finishes requests, flushes the access log). SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.output.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def write_conf(prefix: Path, listen_port: int, ports: list[int]) -> Path:
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        prefix.chmod(0o755)  # nginx's workers run as `nobody`: they must reach their temp dirs
    conf = prefix / "nginx.conf"
    conf.write_text(render_conf(TEMPLATE.read_text(), listen_port, ports))
    return conf


def work_dir(given: str | None) -> Path:
    if given:
        work = Path(given).absolute()
        work.mkdir(parents=True, exist_ok=True)
        return work
    work = Path(tempfile.mkdtemp(prefix="switchboard-replicas-"))  # 0700
    if os.geteuid() == 0:
        work.chmod(0o711)  # nginx's workers run as `nobody`: they must reach their temp dirs below
    return work


async def start_nginx(
    binary: str, prefix: Path, listen_port: int, ports: list[int], started: list[Nginx]
) -> Nginx:
    """deploy/nginx.conf rendered for these ports into `prefix`, checked (nginx -t), running, its
    port accepting connections."""
    nginx = Nginx(binary, prefix, write_conf(prefix, listen_port, ports))
    nginx.check()
    nginx.start()
    started.append(nginx)
    deadline = time.monotonic() + 10
    while True:
        if nginx.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with {nginx.proc.returncode}:\n{nginx.tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", listen_port)
            writer.close()
            return nginx
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nginx not listening on {listen_port} after 10 s:\n{nginx.tail()}"
                ) from None
            await asyncio.sleep(0.05)


async def check_retry_policy(
    binary: str, work: Path, ports: list[int], http: aiohttp.ClientSession, started: list[Nginx]
) -> dict:
    """What deploy/nginx.conf does with a POST /orders that a replica received and then dropped
    (closed the connection without answering: what a keep-alive connection closed by a stopping
    replica looks like to nginx), deterministically: the first upstream is a fake replica that
    reads the request and closes. A fresh nginx (one worker) sends its first request to the first
    server. Expected: without Idempotency-Key, 502 (nginx never sends a POST twice); with one,
    201 from the next replica (one order: the fake created nothing)."""
    dropped: list[int] = []

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            dropped.append(1)
        writer.close()

    fake = await asyncio.start_server(drop, "127.0.0.1", 0)
    fake_port = fake.sockets[0].getsockname()[1]
    outcome: dict = {}
    try:
        for mode in ("without_key", "with_key"):
            listen_port = free_ports(1)[0]
            nginx = await start_nginx(
                binary, work / f"nginx-{mode}", listen_port, [fake_port, *ports[1:]], started
            )
            before = len(dropped)
            headers = (
                {"Idempotency-Key": f"retry-policy-{secrets.token_hex(4)}"} if mode == "with_key" else {}
            )
            body = {
                "customer_id": CHECK_CUSTOMER,
                "items": [{"sku": "retry-policy-check", "quantity": 1}],
                "payment_method": "pm_card_ok",
            }
            status, _ = await post_json(http, f"http://127.0.0.1:{listen_port}/orders", body, headers)
            nginx.stop()
            entries = [
                e for e in read_access_log(nginx.prefix / "logs" / "access.log") if e.get("uri") == "/orders"
            ]
            outcome[mode] = {
                "status": status,
                "fake_replica_dropped": len(dropped) - before,
                "upstreams": entries[-1]["upstream"] if entries else None,
            }
    finally:
        fake.close()
        await fake.wait_closed()
    outcome["as_expected"] = (
        outcome["without_key"]["fake_replica_dropped"] == 1
        and outcome["without_key"]["status"] == 502
        and outcome["with_key"]["fake_replica_dropped"] == 1
        and outcome["with_key"]["status"] == 201
    )
    return outcome


# -- replicas --------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):  # held open together, so the ports differ
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def replica_env(url: str, token: str) -> dict[str, str]:
    environment = env.server_env(url)
    for name in ("SWITCHBOARD_MODULES", "SWITCHBOARD_BASE_URL", "SWITCHBOARD_DATA_DIR"):
        environment.pop(name, None)  # all modules; each replica registers its own address
    environment["SWITCHBOARD_INTERNAL_TOKEN"] = token
    return environment


async def place_order_ok(http: aiohttp.ClientSession, port: int) -> float:
    """This replica's count of successful PlaceOrder commands (its own /metrics)."""
    async with http.get(
        f"http://127.0.0.1:{port}/metrics", timeout=aiohttp.ClientTimeout(total=5)
    ) as response:
        text = await response.text()
    return sum(float(v) for v in PLACE_ORDER_OK.findall(text))


def stop_all(replicas: list[env.ServerProcess], timeout: float = 20.0) -> None:
    """SIGTERM to every replica's process group at once, then wait; SIGKILL after `timeout`."""
    running = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
    for replica in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for replica in running:
        try:
            replica.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(replica.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                replica.proc.wait(5)


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(proc.wait, timeout)
    return proc.poll()


# -- load ------------------------------------------------------------------------------------------


async def post_json(
    http: aiohttp.ClientSession, url: str, body: dict, headers: dict[str, str]
) -> tuple[int, object]:
    async with http.post(url, json=body, headers=headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, text[:200]


async def add_stock(http: aiohttp.ClientSession, base: str, skus: list[str], quantity: int) -> Counter:
    statuses: Counter = Counter()
    for sku in skus:  # one at a time: few, and each SKU is its own stream
        status, body = await post_json(
            http, f"{base}/inventory/items", {"sku": sku, "quantity": quantity}, {}
        )
        statuses[status] += 1
        if status != 201:
            say(f"adding stock for {sku}: HTTP {status} {body}")
    return statuses


async def place_orders(
    http: aiohttp.ClientSession,
    base: str,
    *,
    orders: int,
    concurrency: int,
    skus: list[str],
    use_keys: bool,
    kill_after: int,
    on_threshold,
) -> list[dict]:
    """`orders` POST /orders through nginx, `concurrency` at a time; `on_threshold()` runs (as its
    own task) once `kill_after` of them were answered."""
    run = secrets.token_hex(4)
    records: list[dict] = []
    next_index = iter(range(orders))
    fired = asyncio.Event()
    threshold_task: list[asyncio.Task] = []

    async def worker() -> None:
        for i in next_index:
            payment = "pm_card_declined" if i % 3 == 2 else "pm_card_ok"
            body = {
                "customer_id": f"c-{i % 50}",
                "items": [{"sku": skus[i % len(skus)], "quantity": 1}],
                "payment_method": payment,
            }
            key = f"replicas-{run}-{i}"
            headers = {"Idempotency-Key": key} if use_keys else {}
            record = {"i": i, "payment_method": payment, "key": key, "sent": time.time()}
            try:
                status, answer = await post_json(http, f"{base}/orders", body, headers)
                record["status"] = status
                if status == 201 and isinstance(answer, dict):
                    record["order_id"] = answer["order_id"]
                else:
                    record["body"] = answer
            except (aiohttp.ClientError, TimeoutError, OSError) as error:
                record["status"] = None
                record["error"] = f"{type(error).__name__}: {error}"
            record["answered"] = time.time()
            records.append(record)
            if len(records) >= kill_after and not fired.is_set():
                fired.set()
                threshold_task.append(asyncio.create_task(on_threshold()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if threshold_task:
        await threshold_task[0]
    return records


NGINX_ERROR = re.compile(r"\[(?:error|crit|alert|emerg)\] \d+#\d+: (?:\*\d+ )?(.*?)(?:,| while |$)")


def nginx_errors(path: Path) -> dict[str, int]:
    """nginx's error lines by message (e.g. `connect() failed (111: Connection refused)`: a retry
    before anything was sent; `upstream prematurely closed connection`: after)."""
    found: Counter = Counter()
    try:
        for line in path.read_text(errors="replace").splitlines():
            match = NGINX_ERROR.search(line)
            if match:
                found[match.group(1).strip()] += 1
    except OSError:
        pass
    return dict(found)


def read_access_log(path: Path) -> list[dict]:
    entries = []
    try:
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    except OSError:
        pass
    return entries


# -- the run ---------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> tuple[dict, bool]:
    t0 = time.monotonic()
    result: dict = {"measurement": "replicas", "replicas": REPLICAS}
    nginx_binary = find_nginx()
    raise_nofile(20_000)  # nginx's worker_connections; the replicas inherit it too
    work = work_dir(args.data_dir)
    database: env.DatabaseServer | None = None
    replicas: list[env.ServerProcess] = []
    nginx: Nginx | None = None
    nginxes: list[Nginx] = []
    ok = failed = False
    try:
        # PostgreSQL, migrated
        external = os.environ.get("DATABASE_URL") or None
        say("starting PostgreSQL" + (" (DATABASE_URL's server)" if external else f" (embedded, in {work})"))
        database = await asyncio.to_thread(env.DatabaseServer, work / "postgres", external)
        url = await database.fresh(DATABASE)
        result["postgres"] = {
            k: v for k, v in (await database.settings()).items() if k in ("server_version", "max_connections")
        }

        # 3 replicas, all modules, one database
        ports = free_ports(REPLICAS)
        token = secrets.token_hex(16)
        command = env.switchboard_command()
        for n, port in enumerate(ports, 1):
            replicas.append(
                env.ServerProcess(
                    f"replica-{n}",
                    command + ["serve", "--port", str(port), "--no-migrate"],
                    replica_env(url, token),
                    work / "logs" / f"replica-{n}.log",
                )
            )
        say(f"starting {REPLICAS} replicas on ports {', '.join(map(str, ports))}")
        for replica in replicas:
            replica.start()
        await asyncio.gather(
            *(
                r.wait_ready(f"http://127.0.0.1:{p}/health/ready")
                for r, p in zip(replicas, ports, strict=True)
            )
        )
        instances = [
            (await asyncio.to_thread(env.get_json, f"http://127.0.0.1:{p}/health/ready"))["instance"]
            for p in ports
        ]

        # nginx in front of them
        listen_port = free_ports(1)[0]
        say(f"starting nginx on 127.0.0.1:{listen_port} ({nginx_binary}, {work / 'nginx' / 'nginx.conf'})")
        nginx = await start_nginx(nginx_binary, work / "nginx", listen_port, ports, nginxes)
        base = f"http://127.0.0.1:{listen_port}"
        status = await asyncio.to_thread(env._get_status, f"{base}/health/ready")
        if status != 200:
            raise RuntimeError(f"GET /health/ready through nginx: HTTP {status}")
        version = await asyncio.create_subprocess_exec(nginx_binary, "-v", stderr=asyncio.subprocess.PIPE)
        result["nginx"] = (await version.communicate())[1].decode().strip()

        connector = aiohttp.TCPConnector(limit=args.concurrency + 10)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as http:
            skus = [f"replicas-sku-{n:03d}" for n in range(args.skus)]
            stock = await add_stock(http, base, skus, args.orders)  # enough for every order on one SKU
            result["stock_201"] = stock[201]
            await add_stock(http, f"http://127.0.0.1:{ports[1]}", ["retry-policy-check"], 10)
            say("checking deploy/nginx.conf's retry policy with a replica that drops a POST it received")
            result["retry_policy"] = await check_retry_policy(nginx_binary, work, ports, http, nginxes)

            victim_index = 0
            victim, victim_port = replicas[victim_index], ports[victim_index]
            kill: dict = {}

            async def sigterm_victim() -> None:
                counts = await asyncio.gather(*(place_order_ok(http, p) for p in ports))
                kill["metrics_at_sigterm"] = {
                    f"replica-{n}": int(c - b) for n, (c, b) in enumerate(zip(counts, before, strict=True), 1)
                }
                kill["at"] = time.time()
                os.killpg(victim.pid, signal.SIGTERM)  # the whole group, like systemd or `docker stop`
                say(f"SIGTERM to {victim.name} (port {victim_port}) after {args.kill_after} answers")

            say(
                f"placing {args.orders} orders through nginx, {args.concurrency} at a time"
                + ("" if args.idempotency_key else " (no Idempotency-Key)")
            )
            # PlaceOrder successes per replica, counted from here (the check above placed one)
            before = await asyncio.gather(*(place_order_ok(http, p) for p in ports))
            load_start = time.monotonic()
            records = await place_orders(
                http,
                base,
                orders=args.orders,
                concurrency=args.concurrency,
                skus=skus,
                use_keys=args.idempotency_key,
                kill_after=args.kill_after,
                on_threshold=sigterm_victim,
            )
            result["load_seconds"] = round(time.monotonic() - load_start, 2)

            # the stopped replica: finished, exited on its own, deregistered
            exit_code = await wait_exit(victim.proc, args.stop_timeout)
            victim_info: dict = {
                "name": victim.name,
                "port": victim_port,
                "exit_code": exit_code,
                "stop_seconds": round(time.time() - kill["at"], 2) if exit_code is not None else None,
            }
            survivors = [(r, p) for r, p in zip(replicas, ports, strict=True) if r is not victim]
            final_counts = await asyncio.gather(*(place_order_ok(http, p) for _, p in survivors))

        # nginx's own record: which replica answered each order, and retries (flushed on stop)
        nginx.stop()
        log = [e for e in read_access_log(nginx.prefix / "logs" / "access.log") if e.get("uri") == "/orders"]
        kill_at = kill["at"]
        victim_addr = f"127.0.0.1:{victim_port}"
        port_names = {f"127.0.0.1:{p}": r.name for r, p in zip(replicas, ports, strict=True)}
        per_replica: dict[str, dict] = {r.name: {"orders_201": 0} for r in replicas}
        retried = []
        for entry in log:
            attempts = [a.strip() for a in entry["upstream"].split(",") if a.strip()]
            if len(attempts) > 1:
                retried.append(
                    {
                        "status": entry["status"],
                        "upstreams": entry["upstream"],
                        "upstream_status": entry["upstream_status"],
                    }
                )
            if entry["status"] == 201 and attempts and attempts[-1] in port_names:
                per_replica[port_names[attempts[-1]]]["orders_201"] += 1
        answered_201 = sum(v["orders_201"] for v in per_replica.values())
        for value in per_replica.values():
            value["share"] = round(value["orders_201"] / answered_201, 3) if answered_201 else 0.0
        for (replica, _), count in zip(survivors, final_counts, strict=True):
            per_replica[replica.name]["place_order_ok_metric"] = int(count - before[replicas.index(replica)])
        per_replica[victim.name]["place_order_ok_metric_at_sigterm"] = kill["metrics_at_sigterm"][victim.name]
        victim_info["answered_after_sigterm"] = sum(
            1 for e in log if e["upstream"].split(",")[-1].strip() == victim_addr and e["t"] > kill_at
        )
        at_sigterm = kill["metrics_at_sigterm"]
        spread_ok = (
            all(c >= args.min_share * sum(at_sigterm.values()) for c in at_sigterm.values())
            and sum(at_sigterm.values()) > 0
        )

        # settle: every accepted order paid or declined, as its card says; nothing created twice
        statuses = Counter(r["status"] for r in records)
        accepted = {r["order_id"]: r["payment_method"] for r in records if r["status"] == 201}
        unanswered = [r for r in records if r["status"] != 201]
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT instance_id FROM services")
            victim_info["deregistered"] = instances[victim_index] not in {r["instance_id"] for r in rows}
            settle_start = time.monotonic()
            while True:
                rows = await conn.fetch(
                    "SELECT order_id::text AS id, status FROM orders_view WHERE order_id = ANY($1::uuid[])",
                    list(accepted),
                )
                final = {r["id"]: r["status"] for r in rows if r["status"] in ("paid", "payment_declined")}
                if len(final) == len(accepted) or time.monotonic() - settle_start > args.settle_timeout:
                    break
                await asyncio.sleep(0.2)
            settle_seconds = round(time.monotonic() - settle_start, 2)
            placed_events = await conn.fetchval(
                "SELECT count(*) FROM events WHERE type = 'orders.OrderPlaced' AND data->>'customer_id' <> $1",
                CHECK_CUSTOMER,
            )
            outbox_pending = await conn.fetchval("SELECT count(*) FROM outbox WHERE status <> 'delivered'")
            dead_letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
        finally:
            await conn.close()
        wrong_status = {
            oid: (final.get(oid), FINAL[pm]) for oid, pm in accepted.items() if final.get(oid) != FINAL[pm]
        }

        shutdown_window = (kill_at, kill_at + (victim_info["stop_seconds"] or args.stop_timeout) + 1.0)
        non_201 = {str(k): v for k, v in statuses.items() if k != 201}
        at_sigterm_502 = [
            r
            for r in unanswered
            if r["status"] == 502 and shutdown_window[0] - 0.5 <= r["answered"] <= shutdown_window[1]
        ]
        result.update(
            {
                "orders_sent": len(records),
                "accepted_201": statuses[201],
                "non_201": non_201,
                "non_201_samples": [
                    {k: r.get(k) for k in ("i", "status", "body", "error")} for r in unanswered[:5]
                ],
                "idempotency_key": args.idempotency_key,
                "retried_by_nginx": len(retried),
                "retried_samples": retried[:5],
                "nginx_errors": nginx_errors(nginx.output),
                "per_replica": per_replica,
                "metrics_at_sigterm": at_sigterm,
                "spread_ok": spread_ok,
                "victim": victim_info,
                "settled": len(final),
                "settled_paid": sum(1 for s in final.values() if s == "paid"),
                "settled_declined": sum(1 for s in final.values() if s == "payment_declined"),
                "settle_seconds": settle_seconds,
                "wrong_status": len(wrong_status),
                "orders_placed_events": placed_events,
                "unanswered_orders_created": placed_events - statuses[201],
                "outbox_pending": outbox_pending,
                "dead_letters": dead_letters,
            }
        )
        every_accepted = statuses[201] == len(records) == args.orders
        # Without keys nginx cannot retry a sent POST: a 502 as the replica stops is the client's
        # to retry (reported, allowed only in that mode); an order behind it may or may not exist.
        allowed = not args.idempotency_key and len(at_sigterm_502) == len(unanswered)
        duplicates_ok = placed_events == statuses[201] if every_accepted else placed_events >= statuses[201]
        result["allowed_502_at_sigterm"] = len(at_sigterm_502) if allowed else 0
        ok = (
            result["retry_policy"]["as_expected"]
            and (every_accepted or allowed)
            and spread_ok
            and victim_info["exit_code"] == 0
            and victim_info["deregistered"]
            and len(final) == len(accepted)
            and not wrong_status
            and duplicates_ok
            and dead_letters == 0
        )
        result["ok"] = ok
        failed = not ok
        return result, ok
    except Exception:
        failed = True
        raise
    finally:
        result["seconds"] = round(time.monotonic() - t0, 1)
        # Whatever happened (Ctrl-C, twice, included), stop everything: each step is bounded.
        previous = signal.signal(signal.SIGINT, lambda *_: say("stopping everything, please wait"))
        try:
            for each in nginxes:
                with contextlib.suppress(Exception):
                    each.stop(signal.SIGTERM)
            stop_all(replicas)
            if database is not None:
                with contextlib.suppress(Exception):
                    await database.close()
        finally:
            signal.signal(signal.SIGINT, previous)
        if failed and replicas:
            for replica in replicas:
                say(f"--- {replica.name} log tail ---\n{replica.tail(15)}")
        if args.data_dir or args.keep:
            say(f"kept {work} (logs/, nginx/, postgres/)")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.split("\n\n")[0])
    p.add_argument("--orders", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument(
        "--kill-after", type=int, default=None, help="answers before the SIGTERM (default: 40%% of orders)"
    )
    p.add_argument("--skus", type=int, default=20)
    p.add_argument(
        "--no-idempotency-key",
        dest="idempotency_key",
        action="store_false",
        help="send orders without Idempotency-Key: nginx then cannot retry a POST it already sent",
    )
    p.add_argument(
        "--min-share", type=float, default=0.1, help="each replica's least share before the SIGTERM"
    )
    p.add_argument("--settle-timeout", type=float, default=60.0)
    p.add_argument("--stop-timeout", type=float, default=30.0, help="for the SIGTERMed replica to exit")
    p.add_argument("--data-dir", help="work in this folder and keep it (default: a temporary one, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, nginx.conf)")
    args = p.parse_args(argv)
    if args.kill_after is None:
        args.kill_after = max(1, int(args.orders * 0.4))

    async def guarded() -> tuple[dict, bool]:
        task = asyncio.current_task()
        with contextlib.suppress(NotImplementedError):  # SIGTERM to us: clean up like Ctrl-C
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    try:
        result, ok = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        say("interrupted: everything stopped")
        sys.exit(130)
    print(json.dumps(result), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
