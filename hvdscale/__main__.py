"""`python -m hvdscale ...` is the same as the `hvdscale` command."""
import sys

from hvdscale.cli import main

sys.exit(main())
