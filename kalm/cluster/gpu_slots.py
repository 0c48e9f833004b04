"""Give every GPU job its own devices: ``kalm gpu-slots --gpus N [--torchrun] [--nodes K] -- CMD ...``.

Snakemake counts a ``gpu`` resource but never says *which* GPUs a job may use (its feature request
snakemake#281 has been open since 2020), so two concurrent jobs on a multi-GPU workstation would
both start on device 0. Every GPU rule therefore runs its command through this launcher, which

1. takes the machine's device pool: ``KALM_GPUS`` (e.g. ``0,1,2,3``) when set, else the inherited
   ``CUDA_VISIBLE_DEVICES`` (what SLURM gave the job, or what the user restricted Snakemake to),
   else one entry per ``nvidia-smi -L`` line;
2. locks N devices of the pool with ``flock`` on one file per device (``KALM_GPU_LOCK_DIR``, default
   ``/tmp/kalm-gpu-locks``; inside a SLURM allocation a sub-folder per job id, because with device
   cgroups every job on a node calls its own GPU "0"). A job of the SLURM executor, whose pool is
   exactly the N devices SLURM gave it, needs no lock;
3. sets ``CUDA_VISIBLE_DEVICES`` to those devices and ``exec``s the command, which inherits the lock
   file descriptors: the kernel releases the locks when the job's last process exits, also after
   ``kill -9``, so no stale state is ever left to clean up. A job that finds fewer free devices
   than it needs waits (holding none, so two jobs can never deadlock on half their devices).

Snakemake's ``resources: gpu=`` limit (profiles/local sets it to the pool size) keeps jobs from
queueing on the locks in the first place; the locks are what makes sharing a device impossible,
also across several Snakemake runs on one machine.

``--gpus 0`` hides every GPU (``CUDA_VISIBLE_DEVICES=""``), so a CPU job never touches a GPU
that another job holds. With ``--torchrun`` and more than one device the command is started by
``torchrun --standalone --nproc-per-node <devices> --no-python CMD`` (each rank gets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT and sees all the job's devices). With ``--nodes K > 1``
(a multi-node SLURM job; N is the total over all nodes) the launcher runs
``srun --nodes K --ntasks K --ntasks-per-node 1`` of itself, and each node's task starts
``torchrun --nnodes K --nproc-per-node N/K --rdzv-backend c10d --rdzv-endpoint <first node>:<port>``.

Leading ``NAME=value`` words of CMD are environment assignments, as with env(1), so a rule's
``OMP_NUM_THREADS={threads} ...`` keeps working behind the launcher.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_LOCK_DIR = "/tmp/kalm-gpu-locks"
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _split_devices(value: str) -> list[str]:
    return [d.strip() for d in value.split(",") if d.strip()]


def device_pool(env: dict[str, str] | None = None) -> list[str]:
    """The devices jobs may be given, in order: KALM_GPUS, else CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    env = os.environ if env is None else env
    for var in ("KALM_GPUS", "CUDA_VISIBLE_DEVICES"):
        if var in env:
            return _split_devices(env[var])
    if shutil.which("nvidia-smi"):
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if res.returncode == 0:
            gpus = [line for line in res.stdout.splitlines() if line.startswith("GPU ")]
            return [str(i) for i in range(len(gpus))]
    return []


def lock_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = Path(env.get("KALM_GPU_LOCK_DIR") or DEFAULT_LOCK_DIR)
    # Inside a SLURM allocation device ids are only meaningful within that allocation.
    return base / f"slurm-{env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else base


def _open_lock(folder: Path, device: str) -> int:
    missing = [d for d in (folder, *folder.parents) if not d.exists()]
    for d in reversed(missing):  # folders we create are shared by every user of the machine, like /tmp
        d.mkdir(exist_ok=True)
        try:
            os.chmod(d, 0o1777)
        except PermissionError:
            pass
    path = folder / ("gpu-" + re.sub(r"[^A-Za-z0-9_.-]", "_", device) + ".lock")
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # flock needs no write access
    try:
        os.fchmod(fd, 0o666)
    except PermissionError:
        pass
    return fd


def try_acquire(n: int, pool: list[str], folder: Path) -> tuple[list[str], list[int]] | None:
    """Lock n devices of the pool now, or none at all (returns None)."""
    got, fds = [], []
    for device in pool:
        if len(got) == n:
            break
        fd = _open_lock(folder, device)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        got.append(device)
        fds.append(fd)
    if len(got) == n:
        return got, fds
    for fd in fds:  # never sit on part of a request: another job may need exactly those
        os.close(fd)
    return None


def acquire(
    n: int, pool: list[str], folder: Path, poll: float = 0.5, log_every: float = 60.0, timeout: float | None = None
) -> tuple[list[str], list[int]]:
    """Lock n devices of the pool, waiting until they are free (all at once, never part of them)."""
    if n > len(pool):
        raise SystemExit(
            f"kalm gpu-slots: the job needs {n} GPU(s) but the device pool has {len(pool)} "
            f"({','.join(pool) or 'none'}); set KALM_GPUS or CUDA_VISIBLE_DEVICES, "
            "or lower resources.gpus in the config"
        )
    start = last_note = time.monotonic()
    while True:
        got = try_acquire(n, pool, folder)
        if got is not None:
            return got
        now = time.monotonic()
        if timeout is not None and now - start > timeout:
            raise SystemExit(f"kalm gpu-slots: no {n} free GPU(s) of {','.join(pool)} after {timeout:.0f} s")
        if now == start or now - last_note >= log_every:
            log.info("waiting for %d free GPU(s) of %s (locks in %s)", n, ",".join(pool), folder)
            last_note = now
        time.sleep(poll * (0.5 + random.random()))  # jitter: waiting jobs do not poll in lockstep


def split_env(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading NAME=value words of a command (as env(1) reads them) and the command itself."""
    assigned = {}
    i = 0
    while i < len(cmd) and _ASSIGNMENT.match(cmd[i]):
        name, value = cmd[i].split("=", 1)
        assigned[name] = value
        i += 1
    return assigned, cmd[i:]


def torchrun_argv(
    cmd: list[str], nproc: int, nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None
) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, same interpreter) starting CMD per rank."""
    argv = [sys.executable, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        argv += ["--standalone", "--nnodes", "1"]  # a free local port, no rendezvous server to name
    else:
        argv += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id or "kalm",
        ]
    return argv + ["--nproc-per-node", str(nproc), "--no-python", *cmd]


def srun_argv(cmd: list[str], gpus: int, nodes: int, host: str, port: int) -> list[str]:
    """One task per node of the allocation, each running this launcher for its node's GPUs."""
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "kalm",
        "gpu-slots",
        "--gpus",
        str(gpus // nodes),
        "--torchrun",
        "--rdzv-endpoint",
        f"{host}:{port}",
        "--",
        *cmd,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def plan(args, env: dict[str, str]) -> tuple[list[str], dict[str, str], list[int]]:
    """The argv to exec, its environment and the lock descriptors it must inherit."""
    assigned, cmd = split_env(args.command)
    if not cmd:
        raise SystemExit("kalm gpu-slots: no command given (kalm gpu-slots --gpus N -- CMD ...)")
    env = {**env, **assigned}
    if args.nodes > 1:
        if args.gpus < args.nodes:
            raise SystemExit(f"kalm gpu-slots: a {args.nodes}-node job needs GPUs on every node (--gpus {args.gpus})")
        if not env.get("SLURM_JOB_ID"):
            raise SystemExit(f"kalm gpu-slots: --nodes {args.nodes} needs a SLURM allocation (no SLURM_JOB_ID)")
        if args.gpus % args.nodes:
            raise SystemExit(f"kalm gpu-slots: {args.gpus} GPUs do not split evenly over {args.nodes} nodes")
        host = socket.gethostname()  # the batch step runs on the allocation's first node
        return srun_argv(cmd, args.gpus, args.nodes, host, _free_port()), env, []
    if args.gpus == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU job must not touch a GPU another job holds
        return cmd, env, []
    pool = device_pool(env)
    folder = lock_dir(env)
    if env.get("SLURM_JOB_ID") and len(pool) == args.gpus:
        # A job of the SLURM executor: SLURM gave it exactly these devices, nobody shares them.
        devices, fds, how = pool, [], "all SLURM gave the job"
    else:
        devices, fds = acquire(args.gpus, pool, folder, poll=args.poll, timeout=args.timeout)
        how = f"locked in {folder}"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    where = f"SLURM job {env['SLURM_JOB_ID']}" if env.get("SLURM_JOB_ID") else socket.gethostname()
    log.info(
        "CUDA_VISIBLE_DEVICES=%s (%d of pool %s on %s; %s)",
        env["CUDA_VISIBLE_DEVICES"],
        len(devices),
        ",".join(pool),
        where,
        how,
    )
    if args.torchrun and (len(devices) > 1 or args.rdzv_endpoint):
        nnodes = int(env.get("SLURM_NNODES", "1")) if args.rdzv_endpoint else 1
        cmd = torchrun_argv(cmd, len(devices), nnodes, args.rdzv_endpoint, env.get("SLURM_JOB_ID"))
    return cmd, env, fds


def _run(args) -> int:
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    argv, env, fds = plan(args, dict(os.environ))
    log.info("exec: %s", shlex.join(argv))
    if args.dry_run:
        print(shlex.join(argv))
        return 0
    for fd in fds:
        os.set_inheritable(fd, True)  # the command holds the locks; the kernel frees them at its exit
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        raise SystemExit(f"kalm gpu-slots: command not found: {argv[0]}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "gpu-slots",
        help="run a command on N GPUs of its own (locks devices, sets "
        "CUDA_VISIBLE_DEVICES; torchrun for multi-GPU training)",
    )
    p.add_argument("--gpus", type=int, required=True, help="devices the command needs (0: hide all GPUs)")
    p.add_argument(
        "--torchrun",
        action="store_true",
        help="start the command with torchrun when it gets more than one device (DDP training)",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes of a multi-node SLURM job (--gpus is the total)")
    p.add_argument("--rdzv-endpoint", help=argparse.SUPPRESS)  # set by the multi-node launcher for its tasks
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=None, help="give up waiting for free GPUs after this many s")
    p.add_argument("--dry-run", action="store_true", help="print the command that would run, run nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ... (leading NAME=value words set env)")
    p.set_defaults(func=_run)
