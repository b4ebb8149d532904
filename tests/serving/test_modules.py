from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.export import script_model
from recsys.models.deepfm import DeepFM
from recsys.models.registry import MODELS
from recsys.models.tables import table_configs
from recsys.serving.modules import Int8Linear, compact_for_quantization

FEATURES = [f"C{i}" for i in range(1, 27)]


def _deepfm(embedding_dim: int, rows: int, batch_norm: bool = False) -> DeepFM:
    torch.manual_seed(0)
    tables = table_configs(FEATURES, [rows] * len(FEATURES), embedding_dim, extra_columns=1, init_std=0.1)
    model = DeepFM(EmbeddingBagCollection(tables=tables), FEATURES, num_dense=13, embedding_dim=embedding_dim,
                   deep_layers=[256, 128], dropout=0.2, batch_norm=batch_norm)  # fmt: skip
    with torch.no_grad():  # trained-looking first-order weights and padding that holds values
        for table in model.sparse_arch.embedding_bag_collection.embedding_bags.values():
            table.weight.normal_(0, 0.1)
    return model.eval()


def _inputs(rows: int, batch: int = 64) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    lengths = torch.randint(0, 3, (len(FEATURES) * batch,))
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.randint(0, rows, (int(lengths.sum()),)),
                                                 lengths=lengths)  # fmt: skip
    return torch.rand(batch, 13) * 3, sparse


def test_int8_linear_keeps_a_per_row_scale() -> None:
    linear = nn.Linear(40, 8)
    with torch.no_grad():
        linear.weight[0] *= 1000  # one large row must not coarsen the others
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8 and quantized.scale.shape == (8, 1)
    x = torch.randn(16, 40)
    error = (quantized(x) - linear(x)).abs()
    bound = (x.abs().sum(1, keepdim=True) * quantized.scale.T / 2) + 1e-5  # half a step per weight
    assert bool((error <= bound).all())


@pytest.mark.parametrize(("embedding_dim", "column_multiple", "width"), [(16, 2, 18), (10, 2, 12), (16, 4, 20), (7, 2, 8)])
def test_compact_copy_computes_the_same_logits(embedding_dim: int, column_multiple: int, width: int) -> None:
    model = _deepfm(embedding_dim, rows=100, batch_norm=True)
    trained_width = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()[0].embedding_dim
    compact = compact_for_quantization(model, 1, MODELS["deepfm"].int8_parts, column_multiple)
    configs = compact.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    assert {c.embedding_dim for c in configs} == {width}
    assert all(isinstance(m, Int8Linear) for m in compact.deep_arch.mlp if not isinstance(m, (nn.ReLU, nn.BatchNorm1d)))
    # the trained model is left as it was
    assert model.sparse_arch.embedding_bag_collection.embedding_bag_configs()[0].embedding_dim == trained_width
    dense, sparse = _inputs(100)
    with torch.no_grad():
        expected, got = model(dense, sparse), compact(dense, sparse)
    assert (got - expected).abs().max() < 0.02 * expected.abs().max()


def test_int8_export_of_the_recipe_dimension_is_over_3_5x_smaller() -> None:
    # D = 16 (the recipe): fp32 rows of 20 columns (16 + first-order + 3 padding) = 80 bytes; int8 rows of
    # 18 columns + an fp16 scale and bias = 22 bytes; the MLP's weights in int8. Tables dominate, as at scale.
    rows = 4000
    model = _deepfm(16, rows)
    serving = {"features": {"dense": [f"I{i}" for i in range(1, 14)], "sparse": FEATURES},
               "preprocessing": {"ids": {"table_rows": dict.fromkeys(FEATURES, rows), "oov_rows": [1] * len(FEATURES)}},
               "negative_sampling_rate": 1.0}  # fmt: skip
    sizes, scores = {}, {}
    dense, sparse = _inputs(rows, batch=256)
    for quantize in (None, "int8"):
        buffer = io.BytesIO()
        scripted = script_model(model, serving, quantize, MODELS["deepfm"])
        torch.jit.save(scripted, buffer)
        sizes[quantize] = buffer.tell()
        scores[quantize] = scripted(dense, sparse)
    assert sizes[None] / sizes["int8"] >= 3.5, sizes
    assert (scores["int8"] - scores[None]).abs().max() < 0.01
