"""``python -m jaxopt2`` runs the ``jaxopt2`` command line (see :mod:`jaxopt2.cli`)."""

import sys

from jaxopt2.cli import main

if __name__ == "__main__":
    sys.exit(main())
