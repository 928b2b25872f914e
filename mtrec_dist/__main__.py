"""``python -m mtrec_dist ...`` is ``mtrec ...`` (for a checkout or environment without the console script)."""
import sys

from mtrec_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
