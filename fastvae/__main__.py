"""``python -m fastvae ...``, which is also what ``torchrun -m fastvae train ...`` runs."""

import sys

from fastvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
