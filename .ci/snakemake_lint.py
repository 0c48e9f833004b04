"""`snakemake --lint`, failing on any lint but the documented exceptions (run by `make lint`).

Exceptions, and why:
- "Specify a conda environment or container for each rule": every rule runs `python -m kalm` from the
  one environment the Makefile (or environment.yaml) installs; a per-rule environment would install
  torch and the package ~30 times.
- "Shell command directly uses variable KALM / GPU_RUN from outside of the rule": the command prefix
  (this interpreter's `-m kalm`, and `kalm gpu-slots`). Passed through `params:` it would become a rerun
  trigger: moving the virtual environment would re-run every job. TRACKING (the training rules'
  `--tracking` JSON, workflow/rules/train.smk) likewise: turning experiment tracking on must not retrain.
"""

from __future__ import annotations

import re
import subprocess
import sys

ALLOWED = [
    re.compile(r"Specify a conda environment or container for each rule"),
    re.compile(r"Shell command directly uses variable (KALM|GPU_RUN|TRACKING) from outside of the rule"),
]


def main() -> int:
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", "workflow/Snakefile", "--lint"], capture_output=True, text=True
    )
    out = res.stdout + res.stderr
    where, bad = "", []
    for line in out.splitlines():
        if line.startswith("Lints for "):
            where = line
        elif re.match(r"\s+\* ", line) and not any(a.search(line) for a in ALLOWED):
            bad.append(f"{where}\n{line}")
    if res.returncode not in (0, 1) or ("Lints for " not in out and res.returncode):
        print(out[-4000:], file=sys.stderr)
        print("snakemake --lint did not run", file=sys.stderr)
        return 2
    for b in bad:
        print(b)
    print(f"snakemake --lint: {len(bad)} lint(s) beyond the documented exceptions (.ci/snakemake_lint.py)")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
