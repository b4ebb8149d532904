#!/usr/bin/env python
"""Raw Criteo (Kaggle train.txt, Terabyte day_N[.gz]) or schema-described logs -> memory-mapped shards.

The same tool as ``recsys preprocess``; see ``recsys.data.preprocess`` for the pipeline. Examples:

    python tools/preprocess_criteo.py --out data/kaggle --ratios train=7,val=2,test=1 --shuffle train.txt
    python tools/preprocess_criteo.py --out data/terabyte --split days --sparse-mode hash day_{0..23}.gz
"""

import argparse
import sys

from recsys.data.preprocess.cli import add_arguments, main_from_args  # imports no torch

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="preprocess_criteo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        sys.exit(main_from_args(parser.parse_args()))
    except KeyboardInterrupt:  # as `recsys preprocess`: outputs are written under temporary names
        print("preprocess_criteo.py: interrupted; nothing was left half-written", file=sys.stderr)
        sys.exit(130)  # the shell's code for SIGINT
