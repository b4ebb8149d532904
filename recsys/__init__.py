"""recsys: large-scale CTR prediction with DeepFM on TorchRec."""

from recsys.install_check import check_install

check_install()

__version__ = "0.1.0"
