#!/usr/bin/env python
"""Submit a recipe with submitit (SLURM, or --cluster local): the same as `qlora-sft submit`.

python launch/submit.py configs/recipes/X.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00
"""

import sys

from qlora_sft.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
