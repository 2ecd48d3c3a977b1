"""Fail when a tracked file refers to a path outside the repository.

    python3 scripts/check_paths.py            # the repository this script is in
    python3 scripts/check_paths.py --root DIR # another git work tree (the tests use a temporary one)

A clone must carry everything its tests and docs need, so no tracked text file may name the
team's workspace beside the repository (a `shared` folder one level up, an absolute path under
the workspace's `work` directory) and no relative Markdown link may climb above the repository
root. Each finding is printed as `file:line: what`, and the exit status is 1 when there is any.
"""

from __future__ import annotations

import argparse
import posixpath
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Spelled in two pieces so that this file does not match itself.
_SIBLING = re.compile(re.escape("..") + r"/shared\b")
# An absolute path that starts at the workspace's `work` directory ("/tmp/work/" in a test is a local path).
_WORKSPACE = re.compile(r"(?<![\w.~/-])/" + r"work/")
# Inline links and images, `[text](target "title")`, and reference definitions, `[name]: target`.
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?([^\s>]+)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tracked_files(root: Path) -> list[str]:
    """The repository's tracked files, as paths relative to `root`."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True, capture_output=True).stdout
    return [name for name in listed.decode().split("\0") if name]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (an image, a video) or one that is gone."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def escapes_root(name: str, target: str) -> bool:
    """Whether a relative link `target` in the tracked file `name` resolves above the repository root."""
    target = target.split("#", 1)[0].split("?", 1)[0]
    if not target or _SCHEME.match(target) or target.startswith("/"):
        return False  # an anchor, a URL, or a path from the root (GitHub's reading of a leading slash)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return resolved == ".." or resolved.startswith("../")


def findings(name: str, text: str) -> Iterator[str]:
    """`file:line: what` for every reference in one file to a path outside the repository."""
    markdown = name.lower().endswith((".md", ".markdown"))
    for number, line in enumerate(text.splitlines(), start=1):
        where = f"{name}:{number}"
        if _SIBLING.search(line):
            yield f"{where}: names the shared folder beside the repository (a clone does not have it)"
        if _WORKSPACE.search(line):
            yield f"{where}: names an absolute path under /{'work'} (outside the repository)"
        if markdown:
            targets = _INLINE_LINK.findall(line) + _REFERENCE_LINK.findall(line)
            for target in targets:
                if escapes_root(name, target):
                    yield f"{where}: links {target!r}, which resolves outside the repository"


def check(root: Path) -> list[str]:
    """Every finding in the tracked text files under `root`."""
    found: list[str] = []
    for name in tracked_files(root):
        text = read_text(root / name)
        if text is not None:
            found.extend(findings(name, text))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    found = check(args.root)
    for finding in found:
        sys.stdout.write(finding + "\n")
    if found:
        sys.stderr.write(f"{len(found)} reference(s) to paths outside the repository; the project must stand alone\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
