"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's
`slurm-wlm` and `munge` packages, started in a private folder with private ports.

Nothing is mocked except the GPUs: the node declares two GPUs as GRES (`gpu:<type>:2`) whose
device files are character devices made with `mknod ... c 1 3` (the kernel's /dev/null driver).
Slurm only needs a device file per GPU to count, allocate and export it (it sets
CUDA_VISIBLE_DEVICES for the job), so jobs are scheduled exactly as on a GPU node; nothing in the
jobs opens those files.

Why each setting (Slurm 22.05 from Debian 12, measured):
- munged runs as the `munge` user, in foreground, with its socket, key, pid and log in our folder
  (slurm.conf `AuthInfo=socket=...`), so the system's /run/munge and /etc/munge are not used.
- `AccountingStorageType=accounting_storage/none`: no slurmdbd. `sacct` then answers nothing, so
  the Snakemake plugin must query with `squeue`, which only sees jobs that finished less than
  `MinJobAge` seconds ago: MinJobAge=600 keeps them visible for the whole run (and lets the test
  read every job's record with `scontrol show job`).
- `JobCompType=jobcomp/filetxt`: one line per finished job (start, end, TRES), kept after MinJobAge.
- `SlurmdParameters=config_overrides`: the node may declare more CPUs and memory than the machine
  has, so that site-sized profile requests (4 CPUs per job, 16 GB) are schedulable on a 2-core CI
  machine; GPUs remain the only resource that limits how many GPU jobs run at once.
- `ProctrackType=proctrack/linuxproc`, `TaskPlugin=task/none`: no cgroups (CI containers have none
  we may use); GPU isolation is then by CUDA_VISIBLE_DEVICES, as on most clusters without device
  constraints.
- /etc/slurm/slurm.conf becomes a marked copy of our slurm.conf while the cluster runs (never
  replacing a file we did not write): the plugin's jobstep drops SLURM_CONF with every other SLURM_*
  variable before its `srun`, which then reads the default path, as on a real cluster.

Every daemon is a child process of this harness (run in foreground); `stop()` cancels the
cluster's jobs and terminates those processes by their own pids, nothing else.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo"]


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, or the packages cannot be installed)."""


def ensure_packages(quiet: bool = True) -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing (idempotent, ~20 s)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("needs root to install slurm-wlm and munge and to run slurmd")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable(f"{', '.join(b for b in BINARIES if not shutil.which(b))} missing and no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    out = subprocess.DEVNULL if quiet else None
    res = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
        env=env,
        stdout=out,
        stderr=subprocess.PIPE,
        text=True,
    )
    if res.returncode != 0:  # a stale package index: update once and retry
        subprocess.run(["apt-get", "update", "-qq"], env=env, stdout=out, stderr=subprocess.DEVNULL)
        res = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
            env=env,
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
        )
    missing = [b for b in BINARIES if not shutil.which(b)]
    if res.returncode != 0 or missing:
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {res.stderr.strip()[-500:]}")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class SlurmCluster:
    """One node (`cpus` CPUs, `gpus` fake GPUs of GRES type `gpu_type`), partitions named in
    `partitions` (all on that node; the first is the default)."""

    gpus: int = 2
    gpu_type: str = "a100"
    cpus: int = 16
    mem_mb: int = 512000
    partitions: tuple[str, ...] = ("cpu", "gpu")
    min_job_age: int = 600
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kalm-slurm-")))
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _owns_system_conf: bool = False

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, ... and Snakemake's plugin)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def jobcomp(self) -> Path:
        return self.root / "log" / "jobcomp.txt"

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        if os.geteuid() != 0:
            raise ClusterUnavailable("needs root (slurmd runs jobs as their user; munged as 'munge')")
        ensure_packages()
        try:
            self._write_config()
            self._start_munge()
            self._start("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._wait(
                lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]), timeout, "slurmctld"
            )
            self._start("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait(self._node_idle, timeout, "slurmd (node idle)")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (by pid)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(
                ["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name],
                env=self.env,
                capture_output=True,
                timeout=30,
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._out(["squeue", "-h", "-t", "R,CG"]).strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._owns_system_conf:
            SYSTEM_CONF.unlink(missing_ok=True)
            self._owns_system_conf = False

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- queries ----------------------------------------------------------------------------
    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still holds (MinJobAge keeps finished ones), as `scontrol show job -d`
        key=value records; per-node GPU indices are under 'GRES' (e.g. 'gpu:a100:1(IDX:0)')."""
        out = self._out(["scontrol", "-d", "-o", "show", "job"])
        records = []
        for line in out.splitlines():
            if not line.startswith("JobId="):
                continue
            rec = {}
            # values may contain spaces only in a few fields (Command, Comment is ours: no spaces)
            for m in re.finditer(r"(\S+?)=(\S*)", line):
                rec.setdefault(m[1], m[2])
            records.append(rec)
        return records

    def log(self, name: str) -> str:
        path = self.root / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- internals --------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return socket.gethostname().split(".")[0]

    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "log", "dev", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (user munge) must reach its folder inside
        ctld_port, d_port = _free_ports(2)
        devices = []
        for i in range(self.gpus):
            dev = self.root / "dev" / f"fakegpu{i}"
            if not dev.exists():
                # a character device (the /dev/null driver): Slurm's GRES plugin rejects plain files
                subprocess.run(["mknod", str(dev), "c", "1", "3"], check=True)
            devices.append(dev)
        munge_socket = self.root / "munge" / "munge.socket.2"
        gres = f"Gres=gpu:{self.gpu_type}:{self.gpus}"
        parts = "\n".join(
            f"PartitionName={p} Nodes={self.node} Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
            for i, p in enumerate(self.partitions)
        )
        self.conf.write_text(f"""\
ClusterName=kalmtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "run" / "slurmctld.pid"}
SlurmdPidFile={self.root / "run" / "slurmd.pid"}
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MinJobAge={self.min_job_age}
SlurmdParameters=config_overrides
InactiveLimit=0
MailProg=/bin/true
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} {gres} State=UNKNOWN
{parts}
""")
        dev_range = f"{devices[0].parent}/fakegpu[0-{self.gpus - 1}]" if self.gpus > 1 else str(devices[0])
        (self.root / "etc" / "gres.conf").write_text(f"Name=gpu Type={self.gpu_type} File={dev_range}\n")
        self._install_client_conf()

    def _install_client_conf(self) -> None:
        """Make /etc/slurm/slurm.conf a copy of ours, for Slurm clients inside jobs.

        Daemons and the harness's own clients use `-f`/SLURM_CONF, but the Snakemake jobstep plugin
        strips every SLURM_* variable (SLURM_CONF included) before its `srun`, which then reads the
        default path, as on a real cluster. A system file that we did not write is never touched:
        the cluster is unavailable then."""
        marker = "# written by kalm tests/slurm_cluster.py (pid {}); removed when that cluster stops\n"
        if SYSTEM_CONF.exists():
            m = re.match(re.escape(marker).replace(r"\{\}", r"(\d+)"), SYSTEM_CONF.read_text(errors="replace"))
            if not m:
                raise ClusterUnavailable(f"{SYSTEM_CONF} exists (a real Slurm installation?); not replacing it")
            if int(m[1]) != os.getpid() and Path(f"/proc/{m[1]}").exists():
                raise ClusterUnavailable(f"another test cluster (pid {m[1]}) is running on this machine")
            # else: left by a test process that died; ours to replace
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.write_text(marker.format(os.getpid()) + self.conf.read_text())
        self._owns_system_conf = True

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        mdir = self.root / "munge"
        mdir.mkdir(exist_ok=True)
        os.chmod(mdir, 0o755)  # munged: the socket folder must be searchable by all; the key stays 0400
        key = mdir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for path in (mdir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)

        def as_munge():
            os.setgid(munge.pw_gid)
            os.setgroups([])
            os.setuid(munge.pw_uid)

        self._start(
            "munged",
            [
                "munged",
                "--foreground",
                f"--socket={mdir / 'munge.socket.2'}",
                f"--key-file={key}",
                f"--pid-file={mdir / 'munged.pid'}",
                f"--log-file={mdir / 'munged.log'}",
                f"--seed-file={mdir / 'munged.seed'}",
            ],
            preexec_fn=as_munge,
        )
        self._wait(lambda: (mdir / "munge.socket.2").exists(), 20, "munged")

    def _start(self, name: str, cmd: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, **kw
        )
        log.close()

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; log:\n{self._tail(name)}")
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(
            f"{what} not ready after {timeout} s; logs:\n" + "\n".join(self._tail(n) for n in self.procs)
        )

    def _tail(self, name: str) -> str:
        files = [
            self.root / "log" / f"{name}.log",
            self.root / "log" / f"{name}.out",
            self.root / "munge" / "munged.log",
        ][: 3 if name == "munged" else 2]
        texts = [f.read_text(errors="replace") for f in files if f.exists()]
        return f"--- {name}\n" + "\n".join(t[-3000:] for t in texts if t)

    def _node_idle(self) -> bool:
        return "idle" in self._out(["sinfo", "-h", "-N", "-o", "%T", "-n", self.node])

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0

    def _out(self, cmd: list[str]) -> str:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        return res.stdout


if __name__ == "__main__":  # manual use: start a cluster, print how to reach it, stop on Ctrl-C/SIGTERM
    import signal

    cluster = SlurmCluster().start()
    print(f"export SLURM_CONF={cluster.conf}\n(Ctrl-C or kill {os.getpid()} stops the daemons)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        cluster.cleanup()
