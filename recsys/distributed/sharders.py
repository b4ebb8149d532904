"""Sharders: how TorchRec may split recsys's embedding tables across ranks."""

from __future__ import annotations

from typing import cast

from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import ModuleSharder, ShardingType


class EmbeddingBagSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder, with row-wise and table-row-wise placement on CPU too.

    TorchRec offers row-wise sharding only for CUDA although its CPU path (FBGEMM CPU kernels, bucketized
    input distribution, reduce-scatter over gloo) computes it correctly; tests/distributed checks this
    numerically against single-process training. Without it a table larger than one rank's memory cap
    could not be trained on CPU ranks, and laptops/CI could not exercise row-wise placement.

    Example::

        EmbeddingBagSharder().sharding_types("cpu")
        # ['data_parallel', 'table_wise', 'column_wise', 'table_column_wise', 'row_wise', 'table_row_wise']
        DistributedModelParallel(model, plan=plan, sharders=make_sharders())
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types


def make_sharders() -> list[ModuleSharder[nn.Module]]:
    return [cast(ModuleSharder[nn.Module], EmbeddingBagSharder())]
