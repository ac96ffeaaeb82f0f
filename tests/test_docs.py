"""The README matches the project: its test command is what CI runs, every setting is documented."""

from __future__ import annotations

import re
from pathlib import Path

from qd_app.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    [test_command] = [c for c in commands if "pytest" in c]
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_every_setting_is_in_the_readme_table():
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", README, flags=re.M))
    assert set(RunConfig().to_run_config()) <= documented
