"""``python -m ui``: the web page (see ui/cli.py)."""

from ui.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
