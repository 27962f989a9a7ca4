"""Sub-commands of the hvdscale CLI (see hvdscale/cli.py)."""
