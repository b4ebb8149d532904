from __future__ import annotations

import itertools

import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.fx import symbolic_trace
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import config_from_dict
from recsys.models.deepfm import DeepFM, FactorizationMachine, build_deepfm
from recsys.models.layers import Dropout
from recsys.models.registry import CTRTrain
from recsys.models.tables import table_configs, table_width
from recsys.serving.modules import LogitModel

FEATURES = ["C1", "C2", "C3"]
DENSE = ["I1", "I2"]
D = 8


def small_model(pooling: str = "sum", shared: dict | None = None, mlp_precision: str = "float32") -> DeepFM:
    config = config_from_dict(
        {
            "data": {"dense_features": DENSE, "sparse_features": FEATURES},
            "model": {"embedding_dim": D, "num_embeddings": [10, 20, 30], "deep_layers": [16], "pooling": pooling,
                      "shared_tables": shared or {}, "embedding_init_std": 0.1, "mlp_precision": mlp_precision},
        }
    )  # fmt: skip
    torch.manual_seed(0)
    return build_deepfm(config)


def multi_hot_kjt() -> KeyedJaggedTensor:
    # Batch of 3; C1 one-hot, C2 multi-hot (2, 0, 3 ids), C3 one-hot.
    lengths = torch.tensor([1, 1, 1, 2, 0, 3, 1, 1, 1])
    values = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)


def table(model: DeepFM, feature: str) -> torch.Tensor:
    return model.sparse_arch.embedding_bag_collection.embedding_bags[f"t_{feature}"].weight.detach()


def test_table_width_is_fbgemm_aligned_and_holds_first_order_column() -> None:
    assert [table_width(d, 1) for d in (3, 4, 10, 16, 128)] == [4, 8, 12, 20, 132]
    assert all(c.embedding_dim % 4 == 0 for c in table_configs(FEATURES, [5, 5, 5], 10, extra_columns=1))


def test_fm_equals_brute_force_pair_sum() -> None:
    fields = torch.randn(5, 7, 4, dtype=torch.float64)
    expected = torch.zeros(5, dtype=torch.float64)
    for i, j in itertools.combinations(range(7), 2):
        expected += (fields[:, i] * fields[:, j]).sum(-1)
    torch.testing.assert_close(FactorizationMachine()(fields.sum(1), fields.pow(2).sum((1, 2))), expected)


def test_first_order_term_equals_manual_lookup() -> None:
    model = small_model()
    kjt = multi_hot_kjt()
    dense = torch.rand(3, len(DENSE))
    pooled = model.sparse_arch(kjt)
    assert pooled.shape == (3, len(FEATURES), table_width(D, 1))
    # Manual: sum over each bag of column D of that feature's table.
    per_feature = kjt.to_dict()
    expected = torch.zeros(3)
    for f in FEATURES:
        jt = per_feature[f]
        for row, ids in enumerate(jt.to_dense()):
            expected[row] += table(model, f)[ids, D].sum()
    got = pooled[:, :, D].sum(dim=1)
    torch.testing.assert_close(got, expected)
    _, _, dense_first = model.dense_arch(dense)
    torch.testing.assert_close(dense_first, dense @ model.dense_arch.linear)


def test_logit_equals_textbook_deepfm_over_concatenated_fields() -> None:
    """The fast forward (no field concatenation, split first layer) computes textbook DeepFM."""
    model = small_model()
    kjt, dense = multi_hot_kjt(), torch.rand(3, len(DENSE))
    pooled = model.sparse_arch(kjt)
    fields = torch.cat([dense.unsqueeze(-1) * model.dense_arch.field_vectors, pooled[:, :, :D]], dim=1)  # [B, F, D]
    fm = torch.zeros(3)
    for i, j in itertools.combinations(range(fields.size(1)), 2):
        fm += (fields[:, i] * fields[:, j]).sum(-1)
    deep = model.deep_arch
    first_layer = torch.cat([deep.dense_weight, deep.sparse_weight], dim=1).flatten(1)  # nn.Linear(F * D, H)
    deep_logit = deep.mlp(fields.flatten(1) @ first_layer.t() + deep.bias).squeeze(-1)
    first_order = pooled[:, :, D].sum(1) + dense @ model.dense_arch.linear
    torch.testing.assert_close(model(dense, kjt), model.bias + first_order + fm + deep_logit)


def test_split_first_layer_keeps_linear_init() -> None:
    deep = small_model().deep_arch
    fan_in = (len(DENSE) + len(FEATURES)) * D
    for weight in (deep.dense_weight, deep.sparse_weight, deep.bias):
        assert weight.abs().max() <= fan_in**-0.5


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_multi_hot_pooling(pooling: str) -> None:
    model = small_model(pooling)
    pooled = model.sparse_arch(multi_hot_kjt())
    c2 = table(model, "C2")
    bag = c2[[6, 7, 8]]
    expected = bag.sum(0) if pooling == "sum" else bag.mean(0)
    torch.testing.assert_close(pooled[2, 1], expected)
    torch.testing.assert_close(pooled[1, 1], torch.zeros(table_width(D, 1)))  # empty bag


def test_shared_table_serves_both_features() -> None:
    model = small_model(shared={"shared_c1_c2": ["C1", "C2"]})
    tables = model.sparse_arch.embedding_bag_collection.embedding_bags
    assert sorted(tables.keys()) == ["shared_c1_c2", "t_C3"]
    assert tables["shared_c1_c2"].weight.shape[0] == 20  # the larger vocabulary
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.tensor([5, 5, 0]), lengths=torch.tensor([1, 1, 1]))
    pooled = model.sparse_arch(kjt)
    torch.testing.assert_close(pooled[0, 0], pooled[0, 1])


def test_small_normal_init() -> None:
    weight = table(small_model(), "C3")
    assert 0.05 < weight.std().item() < 0.2


def test_train_wrapper_loss_and_fx_trace() -> None:
    model = small_model()
    batch = Batch(dense_features=torch.rand(3, 2), sparse_features=multi_hot_kjt(), labels=torch.tensor([0, 1, 1]))
    loss, (_, logits, labels) = CTRTrain(model)(batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    torch.testing.assert_close(loss.detach(), expected)
    traced = symbolic_trace(model)
    torch.testing.assert_close(traced(batch.dense_features, batch.sparse_features), logits)


def test_gradients_reach_every_part() -> None:
    model = small_model()
    batch = Batch(dense_features=torch.rand(3, 2), sparse_features=multi_hot_kjt(), labels=torch.tensor([0, 1, 1]))
    CTRTrain(model)(batch)[0].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bfloat16_mlp_is_close_to_float32_traceable_and_trains() -> None:
    exact, mixed = small_model(), small_model(mlp_precision="bfloat16")
    mixed.load_state_dict(exact.state_dict())
    kjt, dense = multi_hot_kjt(), torch.rand(3, len(DENSE))
    logits = mixed(dense, kjt)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact(dense, kjt), rtol=0.02, atol=0.02)
    torch.testing.assert_close(symbolic_trace(mixed)(dense, kjt), logits)
    scripted = torch.jit.script(symbolic_trace(LogitModel(mixed.eval())))  # what `recsys export` compiles
    torch.testing.assert_close(scripted(dense, kjt), logits)
    mixed.train()
    logits.sum().backward()
    assert mixed.deep_arch.sparse_weight.grad.dtype == torch.float32
    assert mixed.deep_arch.sparse_weight.grad.abs().sum() > 0


def test_byte_dropout_keeps_expected_share_scales_and_is_identity_in_eval() -> None:
    drop = Dropout(0.2)
    x = torch.ones(512, 256)
    y = drop(x)
    kept = (y != 0).float().mean().item()
    assert abs(kept - (1 - 51 / 256)) < 0.01  # p rounded to 51/256
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 256 / 205))
    assert abs(y.mean().item() - 1.0) < 0.02  # inverted dropout keeps the expectation
    torch.testing.assert_close(drop.eval()(x), x)


def test_table_backward_runs_on_fewer_threads_and_next_forward_restores() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = small_model()
        model.sparse_arch.table_backward_threads = 1
        kjt, dense = multi_hot_kjt(), torch.rand(3, len(DENSE))
        seen: list[int] = []
        weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_C1"].weight
        weight.register_hook(lambda grad: seen.append(torch.get_num_threads()))
        model(dense, kjt).sum().backward()
        assert seen == [1]
        model(dense, kjt)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
