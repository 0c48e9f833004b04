"""`python -m kalm <subcommand>`: one per module that defines register(), named after the module."""

import subprocess
import sys
from pathlib import Path

from kalm.cli import STAGE_MODULES, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_module_is_the_subcommand_of_its_name():
    assert len(STAGE_MODULES) >= 14 and "kalm.mining.mine" in STAGE_MODULES and "kalm.training.train" in STAGE_MODULES
    for module in STAGE_MODULES:
        sub = build_parser([module])._subparsers._group_actions[0]
        assert list(sub.choices) == [module.rsplit(".", 1)[1].replace("_", "-")], module


def test_a_subcommand_imports_only_its_own_module():
    probe = (
        "import sys\nfrom kalm.cli import build_parser, main\n"
        "try:\n    main(['shards', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('kalm.') and m.count('.') >= 2))\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "False", res.stdout + res.stderr  # no torch for a data subcommand
    assert "kalm.training.train" not in lines[-2] and "kalm.data.shards" in lines[-2]
