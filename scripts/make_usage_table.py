"""Print the table of `pyro-vae train` options (one row per config field) as Markdown.

docs/usage.md embeds its output between the markers <!-- options --> and <!-- /options -->;
run `python scripts/make_usage_table.py --write` after adding a config field.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from pyro_vae.config import config_fields


def table() -> str:
    rows = ["| flag | TOML key | default | meaning |", "|---|---|---|---|"]
    for section, f in config_fields():
        if not f.metadata.get("cli", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            flag = f"{flag} / --no-{f.name.replace('_', '-')}"
        choices = f.metadata.get("choices")
        if callable(choices):
            choices = choices()
        meaning = f.metadata["help"] + (f" ({', '.join(choices)})" if choices else "")
        default_text = " ".join(map(str, default)) if isinstance(default, list) else default
        default_text = f"`{default_text}`" if default_text != "" else "(none)"
        rows.append(f"| `{flag}` | `{section}.{f.name}` | {default_text} | "
                    f"{meaning.replace('|', '/')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update docs/usage.md in place")
    args = parser.parse_args()
    if not args.write:
        print(table())
        return
    path = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
    text = path.read_text()
    new = re.sub(r"<!-- options -->.*<!-- /options -->",
                 lambda m: f"<!-- options -->\n{table()}\n<!-- /options -->", text, flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    main()
