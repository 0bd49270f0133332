"""Regenerate ``jaxopt2/experiment/_bundled.py`` from the repository's ``configs/*.yaml``.

The bundled configs are a plain Python module (name -> YAML text), so they ship with every
kind of install (wheel, sdist, zip) without package-data settings, and ``jaxopt2 run
quickstart`` works from any directory. After adding or editing a file in ``configs/``, run
from the repository root::

    python -m jaxopt2.experiment.bundle

A test checks that the module matches the files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = '''# ruff: noqa: E501
"""Configs bundled with the package: name -> YAML text.

GENERATED from configs/*.yaml by ``python -m jaxopt2.experiment.bundle``; do not edit.
"""

CONFIGS: dict[str, str] = {
'''


def render(config_dir: Path) -> str:
    out = [HEADER]
    for path in sorted(config_dir.glob("*.yaml")):
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True) or [""]
        out.append(f"    {json.dumps(path.stem)}: (\n")
        out.extend(f"        {json.dumps(line)}\n" for line in lines)
        out.append("    ),\n")
    out.append("}\n")
    return "".join(out)


def target() -> Path:
    return Path(__file__).with_name("_bundled.py")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config_dir = Path(argv[0]) if argv else Path("configs")
    if not config_dir.is_dir():
        print(
            f"error: {config_dir} is not a directory (run from the repository root)",
            file=sys.stderr,
        )
        return 2
    text = render(config_dir)
    target().write_text(text, encoding="utf-8")
    print(f"wrote {target()} ({len(list(config_dir.glob('*.yaml')))} configs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
