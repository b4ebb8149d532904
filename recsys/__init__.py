"""recsys: large-scale CTR prediction with DeepFM on TorchRec.

Importing ``recsys`` (or any ``recsys.*`` module) has no side effects: the check that torchrec and FBGEMM
are installed runs where a command starts (``recsys.cli.main``, which torchrun/TorchX workers run too).
"""

__version__ = "0.1.0"
