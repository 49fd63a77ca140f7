"""`python -m aimv2 ...` runs the `aimv2` command (aimv2/cli.py), e.g. from a checkout without an install."""
import sys

from aimv2.cli import main

sys.exit(main())
