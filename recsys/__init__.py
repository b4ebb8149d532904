"""recsys: large-scale CTR prediction with DeepFM on TorchRec."""

import os

# RECSYS_LIGHT_IMPORT=1 skips the torch/TorchRec/FBGEMM check (seconds and ~300 MB per process): the
# preprocessing tool and its worker processes use none of them.
if os.environ.get("RECSYS_LIGHT_IMPORT") != "1":
    from recsys.install_check import check_install

    check_install()

__version__ = "0.1.0"
