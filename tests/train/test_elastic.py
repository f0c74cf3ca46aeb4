"""Two nodes x two workers under torchrun's elastic agent survive killed workers and a lost node.

The two "machines": as root with iproute2, two Linux network namespaces joined by a veth
pair, each with its own network stack and address, and one ``baobab train --nnodes 2``
per namespace, as the README's "Two nodes on one machine" section shows; without root (or
``ip``), or with ``BAOBAB_TEST_HOSTS=loopback``, both nodes run on this machine's loopback
interface instead, which still exercises every restart.

The job (gpt-nano, DDP over 4 ranks, deterministic, a checkpoint every 3 steps,
``--max-restarts 10``) is hit six times: five times a random worker is SIGKILLed at a
random step, then every process of the second node (agent, forkserver, workers) is
killed and the node started again. Each time the job must restart by itself and resume
from the newest complete checkpoint; every step's loss must come out bit for bit the
same however often it was redone; the final weights must equal the single-process run's
at the same global batch (within 1e-5, as for every parallel layout).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from numerics import adam_tolerance, assert_tensors_close, lr_sum

from baobab.checkpoint import load_trained_model, newest_loadable, read_meta
from baobab.cli import main

STEPS, SAVE_EVERY, NODES = 45, 3, 2


def train_args(corpus: Path, run_dir: Path, batch: int) -> list[str]:
    return [
        "--model.name", "gpt-nano", "--model.overrides.n_layer", "1", "--data.path", str(corpus),
        "--data.seq_len", "16", "--data.batch_size", str(batch), "--optim.name", "adamw",
        "--optim.lr", "0.003", "--schedule.warmup_steps", "2", "--train.max_steps", str(STEPS),
        "--train.save_every", str(SAVE_EVERY), "--train.log_every", "1", "--train.progress", "false",
        "--train.eval_batches", "1", "--train.peak_flops", "1e12", "--train.run_dir", str(run_dir),
        "--deterministic",
    ]  # fmt: skip


class Hosts:
    """Where the two nodes run: network namespaces joined by a veth pair, or loopback."""

    def __init__(self) -> None:
        self.tag = f"bb{os.getpid() % 100000}"
        root = os.geteuid() == 0 and shutil.which("ip") is not None
        self.netns = root and os.environ.get("BAOBAB_TEST_HOSTS") != "loopback"
        if not self.netns:
            self.addrs, self.ifnames, self.port = ["127.0.0.1"] * 2, ["lo"] * 2, _free_port()
            return
        net = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"  # exists only inside the pair
        self.addrs, self.port = [f"{net}.1", f"{net}.2"], 29500  # namespaces have free ports
        self.names = [f"{self.tag}n{i}" for i in range(NODES)]
        self.ifnames = [f"{self.tag}v{i}" for i in range(NODES)]
        self.close()  # leftovers of an interrupted run of this same pid
        ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)  # noqa: E731
        for name in self.names:
            ip("netns", "add", name)
        ip("link", "add", self.ifnames[0], "type", "veth", "peer", "name", self.ifnames[1])
        for name, ifname, addr in zip(self.names, self.ifnames, self.addrs):
            ip("link", "set", ifname, "netns", name)
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", ifname)
            ip("-n", name, "link", "set", ifname, "up")
            ip("-n", name, "link", "set", "lo", "up")

    def command(self, node: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[node], *cmd] if self.netns else cmd

    def processes(self, node: int, agent: int) -> list[int]:
        """Every process of a node: the namespace's, or the agent and its descendants."""
        if self.netns:
            out = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True, text=True)  # fmt: skip
            return [int(pid) for pid in out.stdout.split()]
        return [agent, *descendants(agent)]

    def close(self) -> None:
        for name in getattr(self, "names", []):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)  # takes the veth


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit() and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


def workers(agent: int) -> list[int]:
    """The training processes of a node: the children of its agent's forkserver."""
    for child in children(agent):
        try:
            if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                return children(child)
        except OSError:
            continue
    return []


def metrics(run_dir: Path) -> list[dict]:
    path, found = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue  # being written, or cut by a kill
    return found


class Job:
    """The two nodes' launchers, and what the test saw of the run."""

    def __init__(self, hosts: Hosts, corpus: Path, run_dir: Path, logs: Path):
        self.hosts, self.run_dir, self.logs = hosts, run_dir, logs
        self.args = train_args(corpus, run_dir, batch=2)
        self.agents: list[subprocess.Popen | None] = [None] * NODES
        self.seen: dict[int, dict[float, float]] = {}  # step -> {write time: loss}, any attempt

    def start(self, node: int) -> None:
        hosts = self.hosts
        launch = [
            "--nnodes", str(NODES), "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{hosts.addrs[0]}:{hosts.port}", "--rdzv-id", hosts.tag,
            "--local-addr", hosts.addrs[node], "--rdzv-conf", f"is_host={int(node == 0)}",
            "--max-restarts", "10",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": hosts.ifnames[node]}
        cmd = [sys.executable, "-m", "baobab", "train", *launch, *self.args]
        log = open(self.logs / f"node{node}.log", "a")  # noqa: SIM115 (kept for the process)
        self.agents[node] = subprocess.Popen(hosts.command(node, cmd), env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def poll(self) -> tuple[int, list[dict]]:
        """(last step logged, restart records); records every loss seen on the way."""
        records = metrics(self.run_dir)
        for r in records:
            if "loss" in r:
                self.seen.setdefault(r["step"], {})[r["time"]] = r["loss"]
        steps = [r["step"] for r in records if "loss" in r]
        return max(steps, default=0), [r for r in records if r.get("event") == "restart"]

    def wait_for(self, condition, what: str, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not condition(*self.poll()):
            for node, agent in enumerate(self.agents):
                if agent is not None and agent.poll() is not None:
                    raise AssertionError(f"node {node} ended (exit {agent.returncode}) {what}: {self.tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out {what}: {self.tail()}")
            time.sleep(0.02)

    def tail(self) -> str:
        return " | ".join((self.logs / f"node{n}.log").read_text()[-1500:] for n in range(NODES))

    def stop(self) -> None:
        for node, agent in enumerate(self.agents):
            if agent is not None and agent.poll() is None:
                for pid in self.hosts.processes(node, agent.pid):
                    _kill(pid)
                agent.wait()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hosts():
    made = Hosts()
    yield made
    made.close()


def test_killed_workers_and_a_lost_node_cost_only_the_steps_since_the_last_checkpoint(hosts, tiny_corpus, tmp_path):  # fmt: skip
    if not hosts.netns:
        warnings.warn("two nodes on loopback: network namespaces need root and iproute2", stacklevel=1)  # fmt: skip
    seed = int(os.environ.get("BAOBAB_TEST_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    job = Job(hosts, tiny_corpus, tmp_path / "run", tmp_path)
    where = f"(seed {seed}, {'network namespaces' if hosts.netns else 'loopback'})"
    kills = []
    try:
        for node in range(NODES):
            job.start(node)
        for k in range(6):
            step, restarts = job.poll()
            resumed = restarts[-1]["step"] if restarts else 0
            # The first kill falls between checkpoints, so some steps surely get redone.
            target = max(step, resumed) + rng.choice([1, 2, 4, 5] if k == 0 else [1, 2, 3, 4])
            job.wait_for(lambda s, r, t=target: s >= t, f"before kill {k + 1} {where}")
            newest = newest_loadable(job.run_dir)[0]
            before = read_meta(newest)["step"] if newest else 0
            at = job.poll()[0]
            if k < 5:  # a random worker of a random node, at a random step
                victim = rng.choice([w for a in job.agents for w in workers(a.pid)])
                _kill(victim)
            else:  # the second node goes down whole and comes back
                for pid in hosts.processes(1, job.agents[1].pid):
                    _kill(pid)
                job.agents[1].wait()
                job.start(1)
            seen = len(restarts)
            job.wait_for(lambda s, r, n=seen: len(r) > n and s > r[-1]["step"], f"to resume after kill {k + 1} {where}")  # fmt: skip
            kills.append((at, before, job.poll()[1][-1]))
        for node, agent in enumerate(job.agents):
            assert agent.wait(timeout=240) == 0, f"node {node} {where}: {job.tail()}"
    finally:
        job.stop()
    step, restarts = job.poll()
    assert [r["restart"] for r in restarts] == [1, 2, 3, 4, 5, 6], where
    for at, before, record in kills:  # resumed from the newest complete checkpoint
        assert record["step"] % SAVE_EVERY == 0 and before <= record["step"] <= at + 1, (at, before, record, where)  # fmt: skip
        assert record["cause"] and (record["checkpoint"] is None) == (record["step"] == 0)
    final = [r for r in metrics(job.run_dir) if "loss" in r]
    assert [r["step"] for r in final] == list(range(1, STEPS + 1)), where
    redone = {s: sorted(set(w.values())) for s, w in job.seen.items() if len(w) > 1}
    assert redone, f"no step was redone {where}"
    assert all(len(losses) == 1 for losses in redone.values()), f"a redone step gave another loss {where}: {redone}"  # fmt: skip

    reference = tmp_path / "single"  # the same global batch in one process
    assert main(["train", *train_args(tiny_corpus, reference, batch=8)]) == 0
    want = [r["loss"] for r in metrics(reference) if "loss" in r]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in final]), torch.tensor(want), rtol=1e-5, atol=0)  # fmt: skip
    got, ref = load_trained_model(job.run_dir)[0], load_trained_model(reference)[0]
    tol = adam_tolerance(lr_sum(metrics(reference)))  # tests/numerics.py: Adam's rounding noise
    assert_tensors_close(got.state_dict(), ref.state_dict(), tol, f"parameters {where}")
