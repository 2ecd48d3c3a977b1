"""scripts/check_paths.py: a tracked file that refers to a path outside the repository fails the check."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_paths.py"
# Built from pieces so that this file itself never matches the check it tests.
SIBLING = ".." + "/shared"
WORKSPACE = "/" + "work/"


def git_repo(root: Path, files: dict[str, str | bytes]) -> Path:
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    subprocess.run(["git", "add", "--", *files], cwd=root, check=True)
    return root


def run_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True, check=False
    )


CLEAN = {
    "README.md": "# Demo\n\nSee [the design](docs/design.md), [the top](#demo), [a site](https://example.com/../x).\n",
    "docs/design.md": "Back to [the README](../README.md) and [tests](/tests/).\n",
    "tests/test_x.py": 'WORK = "/tmp/work/poster.jpg"  # a local path, not the workspace\nOTHER = "../outside"\n',
    "docs/page.png": b"\x89PNG\r\n\x1a\n\0\0" + SIBLING.encode(),  # binary: not read
}


def test_a_repository_that_stands_alone_passes(tmp_path: Path) -> None:
    result = run_check(git_repo(tmp_path, CLEAN))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("tests/test_vectors.py", f'VECTORS = ROOT.parent / "shared"\nOTHER = "{SIBLING}/conformance"\n', 2),
        ("README.md", f"# Demo\n\nThe contract is [DESIGN.md]({SIBLING}/DESIGN.md).\n", 3),
        ("docs/notes.md", "One line.\nSee [the sibling](../../elsewhere/notes.md).\n", 2),
        ("docs/notes.md", "[design]: ../../DESIGN.md\n", 1),
        ("bench/run.sh", f"cd {WORKSPACE}main && make\n", 1),
    ],
)
def test_a_planted_reference_outside_the_repository_fails_with_its_place(
    tmp_path: Path, name: str, content: str, line: int
) -> None:
    result = run_check(git_repo(tmp_path, {**CLEAN, name: content}))
    assert result.returncode == 1
    assert result.stdout.splitlines()[0].startswith(f"{name}:{line}: ")


def test_untracked_files_are_not_the_repositorys(tmp_path: Path) -> None:
    root = git_repo(tmp_path, CLEAN)
    (root / "scratch.md").write_text(f"[x]({SIBLING}/DESIGN.md)\n", encoding="utf-8")
    assert run_check(root).returncode == 0


def test_this_repository_stands_alone() -> None:
    result = run_check(SCRIPT.parents[1])
    assert result.returncode == 0, result.stdout
