"""A non-editable install, as a user gets it: the built wheel holds exactly one top-level
import package, `treewave`, and the console script installed from it runs from that
package (not from this source tree). Takes about a minute (an isolated build)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.support.commands import REPO, clean_env

SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "artifacts", "build", "*.egg-info")


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_wheel_installs_one_top_level_package_and_the_console_script(tmp_path: Path) -> None:
    # Build from a copy, so the build leaves nothing in the source tree.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=SKIP)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, source, cwd=tmp_path)
    (wheel,) = dist.glob("treewave-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/", 1)[0] for name in archive.namelist()}
    packages = {t for t in top if not t.endswith((".dist-info", ".data"))}
    assert packages == {"treewave"}, top

    # A fresh venv gets the wheel alone; the dependencies come from this environment's
    # site-packages on PYTHONPATH (no .pth processing there, so this tree's editable
    # install stays invisible).
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    site = Path(
        run(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    before = {p.name for p in site.iterdir()}
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    added = {p.name for p in site.iterdir()} - before
    assert {a for a in added if not a.endswith(".dist-info")} == {"treewave"}, added

    env = clean_env(PYTHONPATH=sysconfig.get_paths()["purelib"])
    where = run(python, "-c", "import treewave; print(treewave.__file__)", cwd=tmp_path, env=env)
    assert Path(where.strip()).is_relative_to(site), where
    helped = run(fresh / "bin" / "treewave", "--help", cwd=tmp_path, env=env)
    assert "treewave run" in helped
    simulated = run(fresh / "bin" / "treewave", "simulate", "--nodes", "20", cwd=tmp_path, env=env)
    assert "decided: True" in simulated
