"""`scripts/test` (`make test`, `.ci/run`): on a machine missing the tools the suite calls, it
installs them, says so in one line, and runs pytest.

Run against a PATH with the tools taken out and a stand-in `apt-get` that records what it is
asked to install, so nothing is installed on the machine running these tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

TOOLS = ("docker-compose", "wrk", "chromium", "redis-server")
# Where the tools would come from on this machine: hidden, so that only the stand-ins answer.
HIDDEN = (*TOOLS, "apt-get", "sudo", "id")
VENV = Path(sys.executable).parent.parent

FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$APT_LOG"
if [ "$1" = install ]; then
  for arg in "$@"; do
    case "$arg" in
      -*|install) ;;
      *) printf '#!/bin/sh\\n' > "$INSTALLED/$arg"; chmod +x "$INSTALLED/$arg";;
    esac
  done
fi
"""


def executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def path_without(hidden: tuple[str, ...], farm: Path) -> list[str]:
    """The PATH, each directory holding one of `hidden` replaced by a copy without them."""
    farm.mkdir()
    dirs: list[str] = []
    for entry in os.environ["PATH"].split(os.pathsep):
        folder = Path(entry)
        if not folder.is_dir():
            continue
        if not any((folder / name).exists() for name in hidden):
            dirs.append(entry)
            continue
        for item in folder.iterdir():
            if item.name not in hidden and not (farm / item.name).exists():
                (farm / item.name).symlink_to(item)
        if str(farm) not in dirs:
            dirs.append(str(farm))
    return dirs


def run_test_command(
    tmp_path: Path, *, apt_get: bool, root: bool = True, present: tuple[str, ...] = ()
) -> tuple[str, str]:
    """`scripts/test --version` (pytest's --version: the set-up without the suite) with the
    tools missing but `present`; its output and what apt-get was asked."""
    fake, installed = tmp_path / "fake", tmp_path / "installed"
    fake.mkdir()
    installed.mkdir()
    executable(fake / "id", f"#!/bin/sh\necho {0 if root else 1000}\n")
    if apt_get:
        executable(fake / "apt-get", FAKE_APT_GET)
    for tool in present:
        executable(fake / tool, "#!/bin/sh\n")
    apt_log = tmp_path / "apt.log"
    done = subprocess.run(
        [str(ROOT / "scripts" / "test"), "--version"],
        env={
            **os.environ,
            "PATH": os.pathsep.join(
                [str(installed), str(fake), *path_without(HIDDEN, tmp_path / "bin")]
            ),
            "VENV": str(VENV),
            "APT_LOG": str(apt_log),
            "INSTALLED": str(installed),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("pytest ")  # pytest ran, from $VENV
    apt = apt_log.read_text() if apt_log.exists() else ""
    return done.stdout, apt


def setup_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("test-setup:")]


class TestTheTestCommand:
    def test_installs_the_missing_tools_saying_what_and_why_in_one_line(
        self, tmp_path: Path
    ) -> None:
        output, apt = run_test_command(tmp_path, apt_get=True)
        [line] = setup_lines(output)
        assert line.startswith(
            "test-setup: installing docker-compose wrk chromium redis-server with apt-get ("
        )
        assert "chromium: for the browser tests" in line
        assert apt.splitlines() == [
            "apt-get update -qq",
            "apt-get install -y -qq --no-install-recommends " + " ".join(TOOLS),
        ]
        assert sorted(p.name for p in (tmp_path / "installed").iterdir()) == sorted(TOOLS)

    def test_installs_only_what_is_missing(self, tmp_path: Path) -> None:
        output, apt = run_test_command(
            tmp_path, apt_get=True, present=("docker-compose", "redis-server")
        )
        [line] = setup_lines(output)
        assert line.startswith("test-setup: installing wrk chromium with apt-get (")
        assert apt.splitlines()[-1].endswith("--no-install-recommends wrk chromium")

    def test_without_root_it_says_what_is_missing_and_still_runs_the_suite(
        self, tmp_path: Path
    ) -> None:
        output, apt = run_test_command(tmp_path, apt_get=True, root=False)
        [line] = setup_lines(output)
        assert "cannot install them here" in line
        assert "apt-get install docker-compose wrk chromium redis-server" in line
        assert apt == ""

    def test_with_everything_present_it_says_nothing_and_installs_nothing(
        self, tmp_path: Path
    ) -> None:
        fake = tmp_path / "fake"
        fake.mkdir()
        executable(fake / "apt-get", FAKE_APT_GET)
        for tool in TOOLS:
            executable(fake / tool, "#!/bin/sh\n")
        done = subprocess.run(
            [str(ROOT / "scripts" / "test"), "--version"],
            env={
                **os.environ,
                "PATH": os.pathsep.join([str(fake), os.environ["PATH"]]),
                "VENV": str(VENV),
                "APT_LOG": str(tmp_path / "apt.log"),
            },
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        assert setup_lines(done.stdout) == []
        assert not (tmp_path / "apt.log").exists()
