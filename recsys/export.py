"""Export a trained model for serving: one TorchScript file that runs without TorchRec's sharding.

The latest checkpoint (possibly written by many ranks, with tables split across them) is loaded into an
unsharded DeepFM with torch.distributed.checkpoint, which reassembles every table; the model is traced with
``torchrec.fx.symbolic_trace`` (which keeps KeyedJaggedTensor as a leaf) and compiled with TorchScript.
The served module takes ``(dense [B, F_dense] float32, sparse KeyedJaggedTensor)`` and returns click
probabilities [B]. Full tables must fit in the exporting host's memory.
"""


import json
import os
from pathlib import Path

import torch
import yaml
from torch import nn
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.checkpoint import latest_checkpoint, read_tensors
from recsys.config import Config
from recsys.models.deepfm import DeepFM, DeepFMTrain, build_deepfm


class ServingModel(nn.Module):
    """DeepFM returning probabilities.

    Call args:
        dense: [B, F_dense] transformed numeric features
        sparse: KJT with the training sparse feature keys

    Returns:
        [B] click probabilities
    """

    def __init__(self, model: DeepFM) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        return torch.sigmoid(self.model(dense, sparse))


def load_unsharded(config: Config, table_sizes: list[int], checkpoint: str) -> DeepFM:
    """DeepFM on CPU with the weights of a (possibly sharded) DCP checkpoint."""
    wrapper = DeepFMTrain(build_deepfm(config, table_sizes, device="cpu"))
    wrapper.load_state_dict(read_tensors(checkpoint))
    return wrapper.model.eval()


def export_model(config: Config, table_sizes: list[int], out_dir: str) -> Path:
    """Writes ``out_dir/model.pt`` (TorchScript) and ``out_dir/serving.json`` (inputs it expects)."""
    checkpoint = latest_checkpoint(config.training.run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint in {config.training.run_dir}/checkpoints to export")
    serving = ServingModel(load_unsharded(config, table_sizes, checkpoint)).requires_grad_(False)
    scripted = torch.jit.script(symbolic_trace(serving))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.pt.tmp"
    scripted.save(str(tmp))
    os.replace(tmp, out / "model.pt")
    info = {
        "checkpoint": checkpoint,
        "dense_features": config.data.dense_features,
        "sparse_features": config.data.sparse_features,
        "table_sizes": table_sizes,
        "output": "click probability per row",
    }
    (out / "serving.json").write_text(json.dumps(info, indent=2))
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return out / "model.pt"
