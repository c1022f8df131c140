"""``python -m helpers run``: the notebook series end to end (see ``helpers.run``)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
