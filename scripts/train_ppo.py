"""The seed's entry point: `python scripts/train_ppo.py --model.gaussian_mlp ...` equals
`openpi-rl train ...`."""

import sys

from openpi_rl.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
