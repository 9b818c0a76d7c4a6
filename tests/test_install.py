"""
The install: an editable install (C{pip install -e .}, the usual
contributor install) keeps the twistd plugin visible.

Twisted finds plugins by scanning every C{twisted/plugins/} folder on
C{sys.path}; setuptools' import finder for editable installs does not put
the project on C{sys.path}, so a plugin there is never found (C{twistd:
Unknown command: hyperdaemon}).  The test installs a copy of the project,
editable, into a throwaway virtual environment that borrows this one's
packages (Twisted, pip, setuptools, wheel), offline, and asks Twisted which
plugins it sees.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: A plugin that exists only in the copy: were the installed project's own
#: plugin (a regular install puts it in site-packages) found instead, the
#: copy's editable install would not be what the test checks.
PROBE_PLUGIN = '''\
from twisted.application.service import ServiceMaker

probe = ServiceMaker("install-probe", "hyperdaemon.daemon.tap", "only in the copy", "install-probe")
'''
#: Bound for pip and for one Twisted command.
TIMEOUT = 120


def run(argv: list[str | Path], cwd: Path) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


def project_copy(target: Path) -> Path:
    """What pip needs of the project, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "dropin.cache", "*.egg-info")
    target.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)
    for name in ("hyperdaemon", "twisted"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    (target / "twisted" / "plugins" / "install_probe_plugin.py").write_text(PROBE_PLUGIN)
    return target


def throwaway_venv(target: Path) -> Path:
    """A venv without packages of its own that sees this one's, after its own; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True,
                   timeout=TIMEOUT)
    python = target / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       target).strip())
    # Named to come after the editable install's own .pth file.
    (purelib / "zz_borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_an_editable_install_keeps_the_twistd_plugin_visible(tmp_path: Path) -> None:
    source = project_copy(tmp_path / "project")
    python = throwaway_venv(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"  # not the project: the working directory is on sys.path
    elsewhere.mkdir()
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--editable", source], elsewhere)

    twist_help = run([python, "-m", "twisted", "--help"], elsewhere)
    assert "install-probe" in twist_help and "hyperdaemon" in twist_help, twist_help
    twistd_help = run([python, "-c", "import sys; from twisted.scripts.twistd import run; "
                                     "sys.argv[0] = 'twistd'; run()", "hyperdaemon", "--help"],
                      elsewhere)
    assert "--idle-timeout" in twistd_help, twistd_help


def test_a_regular_install_carries_every_package_of_the_project() -> None:
    # setup.cfg lists the packages by name (find: would miss twisted.plugins,
    # which has no __init__.py on purpose): a new folder of the package that
    # is not listed works from the source tree and in an editable install,
    # and is missing from a regular one (pip install .).
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(init.parent.relative_to(ROOT).parts)
             for init in (ROOT / "hyperdaemon").rglob("__init__.py")}
    assert found - listed == set()
