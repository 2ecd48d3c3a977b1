"""README.md's Layout names every module of services/common, so a reader finds what the services share
(the list once omitted the two largest modules, s3_blobs.py and contract.py)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def common_section() -> str:
    """The indented lines under `services/common/` in README.md's Layout block."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    section = layout.split("\nservices/common/", 1)[1]
    lines = section.splitlines()[1:]
    return "\n".join(line for line in lines[: next(i for i, s in enumerate(lines) if not s.startswith(" "))])


def test_the_layout_names_every_module_of_services_common() -> None:
    common = ROOT / "services" / "common"
    parts = [p.name for p in common.glob("*.py") if p.name != "__init__.py"]
    parts += [f"{p.name}/" for p in common.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    named = common_section()
    missing = sorted(part for part in parts if not re.search(rf"(?<![\w/]){re.escape(part)}", named))
    assert missing == [], f"README.md's Layout does not name services/common's {', '.join(missing)}"
