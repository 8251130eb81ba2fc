"""Issue 16: the README's commands run as written from a fresh clone. Every ```sh block of
README.md runs in a scratch folder beside the repository's scenarios, kept small by a few
stated substitutions (fewer patients, a faster clock, a monitor that stops), with the files
the README shows a user writing (a ```toml block headed ``# NAME.toml``); the blocks that
cannot run here say why."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: (pattern, replacement): what keeps a block small; the command is otherwise as written
SMALLER = [
    (r"--patients \d+", "--patients 2"),
    (r"--realtime 1\.0", "--realtime 0.002"),
    (r"(mpc-dose monitor [^#\n]*?)(\s*#|$)", r"\1 --duration 2\2"),
]
#: blocks not run here, by their first command, and why
NOT_HERE = {
    "make demo": "`make demo` builds its own environment; its commands run in test_cli.py",
    "mpc-dose compare scenarios/t1d_nmpc.toml": "a week of four insulin controllers; "
                                               "tests/test_glucose_nmpc.py runs the NMPC's "
                                               "patient-day end to end",
    "mpc-dose tune": "a sweep of 25 settings x 32 patients; tests/test_tune.py runs sweeps "
                     "end to end",
}


def blocks() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def files_to_write() -> dict[str, str]:
    """The files the README asks a user to write: each ```toml block whose first line is
    ``# NAME.toml``, by NAME.toml."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return dict(re.findall(r"```toml\n# (\S+\.toml)\n(.*?)```", text, flags=re.S))


def _first_command(block: str) -> str:
    return next(line for line in block.splitlines() if line.strip() and
                not line.lstrip().startswith("#")).strip()


@pytest.mark.parametrize("block", blocks(), ids=lambda b: _first_command(b)[:40])
def test_readme_commands_run_as_written(block, tmp_path):
    first = _first_command(block)
    for start, why in NOT_HERE.items():
        if first.startswith(start):
            pytest.skip(why)
    (tmp_path / "scenarios").symlink_to(REPO / "scenarios")
    if "my_patients.csv" in block:  # the cohort file a user would bring: 3 training rows
        rows = (REPO / "scenarios" / "data" / "tiva_training_cohort_32.csv").read_text(
            encoding="utf-8").splitlines()
        header = [r for r in rows if not r.startswith("#")]
        (tmp_path / "my_patients.csv").write_text("\n".join(header[:4]) + "\n")
    for name, content in files_to_write().items():  # the user's own files, as shown
        if name in block:
            (tmp_path / name).write_text(content, encoding="utf-8")
    script = block
    for pattern, replacement in SMALLER:
        script = re.sub(pattern, replacement, script, flags=re.M)
    # the scheduler of a cluster we do not have: the same command on local processes
    script = re.sub(r"--scheduler tcp://\S+", "--workers 1", script)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    result = subprocess.run(["bash", "-e", "-c", "set -o pipefail\n" + script + "\nwait"],
                            cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script}\n---\n{result.stdout[-2000:]}\n" \
                                   f"{result.stderr[-3000:]}"
