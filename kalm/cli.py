"""The ``kalm`` command line: one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` to a callable taking the parsed arguments. Snakemake rules call these
subcommands, so every stage also runs (and is tested) without Snakemake.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


def stage_modules() -> list[str]:
    """Every module of the package that defines ``register(subparsers)``: its subcommand is its name
    (``kalm.evaluation.mteb_mirror`` -> ``kalm mteb-mirror``). Found by reading the files, not importing
    them, so that `kalm validate` does not pay for torch / mteb imports: a new stage is its module."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if re.search(r"^def register\(", path.read_text(encoding="utf-8"), re.M):
            found.append(".".join(("kalm", *path.relative_to(root).with_suffix("").parts)))
    return found


STAGE_MODULES = stage_modules()


def build_parser(modules: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kalm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in modules or STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only import the module of the requested subcommand (torch and mteb are slow to import).
    command = next((a for a in argv if not a.startswith("-")), None)
    wanted = [m for m in STAGE_MODULES if m.rsplit(".", 1)[1].replace("_", "-") == command]
    parser = build_parser(wanted or None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    anon = AnonPeak()  # before the work: its allocations are what it samples
    result = args.func(args)
    log_usage(command, anon.stop())
    return int(result or 0)


USAGE_LINE = "kalm {command}: peak RSS {rss:.1f} MiB (anonymous {anon:.1f} MiB), CPU {cpu:.2f} s"


class AnonPeak:
    """The peak of ``RssAnon`` (heap, arrays, the model: memory the kernel cannot drop), sampled every
    ``interval`` s by a daemon thread. ``VmHWM`` also counts file-backed pages of memory-mapped inputs
    (Arrow shards, .npy vectors), which are page cache the kernel reclaims under pressure: a job reading a
    large memory map has a large VmHWM and a small anonymous peak. Linux only (0 elsewhere)."""

    def __init__(self, interval: float = 0.02):
        import threading

        self.peak_kib = self._read()
        self._done = threading.Event()
        self._thread = None
        if self.peak_kib:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True, name="kalm-anon-peak")
            self._thread.start()

    @staticmethod
    def _read() -> int:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _run(self, interval: float) -> None:
        while not self._done.wait(interval):
            self.peak_kib = max(self.peak_kib, self._read())

    def stop(self) -> float:
        """The peak in MiB (one last sample included)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_kib = max(self.peak_kib, self._read())
        return self.peak_kib / 1024


def peak_rss_mib() -> float:
    """This process's own peak RSS: ``VmHWM`` of /proc/self/status on Linux (the high-water mark of the
    address space exec gave it), else ``getrusage``, whose ``ru_maxrss`` Linux can carry over from the
    parent that forked the process (a job started by a large process would report that one's peak)."""
    import resource

    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def log_usage(command: str | None, anon_mib: float = 0.0) -> None:
    """One line in the job's log with the process's exact peak memory, its sampled anonymous peak and CPU
    time: what to size a SLURM ``mem_mb`` from (Snakemake's ``benchmark:`` samples RSS, and misses jobs
    under a second)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    logging.getLogger("kalm.cli").info(
        USAGE_LINE.format(command=command, rss=peak_rss_mib(), anon=anon_mib, cpu=ru.ru_utime + ru.ru_stime)
    )


if __name__ == "__main__":
    raise SystemExit(main())
