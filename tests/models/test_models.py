"""The models beside DeepFM compute what their references compute: DLRM and DLRM-DCNv2 as TorchRec's
``DLRM`` / ``DLRM_DCN`` with the same weights, DCNv2 as FuxiCTR's formula; the registry builds every model
and refuses exports a model has no hook for."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torchrec.models.dlrm import DLRM as TorchRecDLRM
from torchrec.models.dlrm import DLRM_DCN
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.cli import main
from recsys.config import CHOICES, ConfigError, config_from_dict
from recsys.models import registry
from recsys.models.registry import MODELS, build_model

SPARSE = ["C1", "C2", "C3"]
DENSE = ["I1", "I2"]
D = 8
B = 5


def config(name: str, **model: object):
    return config_from_dict({
        "data": {"dense_features": DENSE, "sparse_features": SPARSE},
        "model": {"name": name, "embedding_dim": D, "num_embeddings": [10, 20, 30], "deep_layers": [16, 8],
                  "embedding_init_std": 0.1, **model},
    })  # fmt: skip


def inputs() -> tuple[torch.Tensor, KeyedJaggedTensor]:
    lengths = torch.tensor([1, 1, 2, 1, 0, 1, 1, 1, 1, 3, 1, 1, 1, 1, 1])
    values = torch.randint(0, 10, (int(lengths.sum()),))
    return torch.rand(B, len(DENSE)), KeyedJaggedTensor.from_lengths_sync(keys=SPARSE, values=values, lengths=lengths)


def linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def copy_linears(source: nn.Module, target: nn.Module) -> None:
    pairs = list(zip(linears(source), linears(target), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


def test_registry_is_the_config_choices() -> None:
    assert list(MODELS) == list(CHOICES["model.name"])
    for name in MODELS:
        dense, sparse = inputs()
        assert build_model(config(name))(dense, sparse).shape == (B,)


@pytest.mark.parametrize("name", ["dlrm", "dlrm_dcnv2"])
def test_dlrm_family_equals_torchrec(name: str) -> None:
    torch.manual_seed(0)
    ours = build_model(config(name, dlrm={"bottom_layers": [4]}, dlrm_dcnv2={"bottom_layers": [4], "low_rank": 3}))
    ebc = ours.sparse_arch.embedding_bag_collection
    if name == "dlrm":
        theirs: nn.Module = TorchRecDLRM(ebc, len(DENSE), [4, D], [16, 8, 1])
    else:
        theirs = DLRM_DCN(ebc, len(DENSE), [4, D], [16, 8, 1], dcn_num_layers=3, dcn_low_rank_dim=3)
        theirs.inter_arch.load_state_dict(ours.inter_arch.state_dict())
    copy_linears(ours.dense_arch, theirs.dense_arch)
    copy_linears(ours.over_arch, theirs.over_arch)
    dense, sparse = inputs()
    torch.testing.assert_close(ours(dense, sparse), theirs(dense, sparse).squeeze(-1))


@pytest.mark.parametrize("structure", ["parallel", "stacked"])
def test_dcnv2_is_fuxictr_dcnv2(structure: str) -> None:
    torch.manual_seed(0)
    model = build_model(config("dcnv2", dcnv2={"structure": structure, "cross_layers": 2}))
    dense, sparse = inputs()
    rows = model.sparse_arch(sparse)[:, :, :D]
    x0 = torch.cat([dense.unsqueeze(2) * model.dense_vectors, rows], dim=1).flatten(1)  # FuxiCTR's field order
    crossed = model.cross_net(x0)
    *hidden, head = list(model.dnn)  # the DNN's last Linear is FuxiCTR's head
    if structure == "stacked":
        expected = head(nn.Sequential(*hidden)(crossed))
    else:  # FuxiCTR: Linear(cat([cross_out, dnn_out]), 1)
        fc = torch.cat([model.cross_head.weight, head.weight], dim=1)
        expected = torch.cat([crossed, nn.Sequential(*hidden)(x0)], dim=1) @ fc.t() + head.bias
    torch.testing.assert_close(model(dense, sparse), expected.squeeze(-1))


@pytest.mark.parametrize("name", ["dlrm_dcnv2", "dcnv2"])
def test_bfloat16_cross_net_is_close_to_float32_and_trains_float32_weights(name: str) -> None:
    torch.manual_seed(0)
    sections = {"dlrm_dcnv2": {"low_rank": 3}, "dcnv2": {"low_rank": 3}}
    exact = build_model(config(name, **sections))
    mixed = build_model(config(name, mlp_precision="bfloat16", **sections))
    mixed.load_state_dict(exact.state_dict())
    cross_net = mixed.inter_arch.crossnet if name == "dlrm_dcnv2" else mixed.cross_net
    assert cross_net.bfloat16
    dense, sparse = inputs()
    x = torch.rand(B, cross_net.V_kernels[0].shape[1])
    assert cross_net(x).dtype == torch.bfloat16
    logits = mixed(dense, sparse)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact(dense, sparse), rtol=0.02, atol=0.02)
    logits.sum().backward()
    for weight in [*cross_net.V_kernels, *cross_net.W_kernels]:
        assert weight.grad.dtype == torch.float32 and weight.grad.abs().sum() > 0


def test_model_sections_are_typed() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rank'\] in section 'model.dcnv2'; valid keys: \['cross_layers'"):
        config("dcnv2", dcnv2={"rank": 4})
    with pytest.raises(ConfigError, match=r"model.name: 'fm' is not one of \['deepfm', 'dlrm'"):
        config("fm")
    with pytest.raises(ConfigError, match="model.dcnv2.experts > 1 mixes low-rank experts"):
        config("dcnv2", dcnv2={"experts": 4})


@pytest.mark.parametrize("flag", [["--onnx"], ["--quantize", "int8"]])
def test_export_without_the_models_hook_is_refused_in_one_line(
    flag: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(registry.MODELS, "dlrm", dataclasses.replace(MODELS["dlrm"], int8_parts=None, onnx=False))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "dlrm"}, "data": {"train": str(tmp_path / "none")}}))
    assert main(["export", str(path), "--out", str(tmp_path / "out"), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"{flag[0]}{' int8' if len(flag) > 1 else ''} is not supported for model dlrm"), err
    assert not (tmp_path / "out").exists()
