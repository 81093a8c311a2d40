"""``python -m rtexport ...`` runs the command-line interface (for checkouts that are not pip-installed)."""

from .cli import entry

if __name__ == "__main__":
    entry()
