"""``python -m robust_resnets`` runs the ``robust-resnets`` command line."""
import sys

from robust_resnets.cli import main

sys.exit(main())
