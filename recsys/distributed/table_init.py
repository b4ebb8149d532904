"""Table initialisation that does not depend on how the tables are sharded."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

# Rows per block of the sharding-independent init: each block has its own generator stream.
INIT_BLOCK_ROWS = 65536


@torch.no_grad()
def init_tables(model: nn.Module, tables: list[EmbeddingBagConfig], seed: int, std: float) -> None:
    """Fills every table shard with N(0, std) values that depend only on (seed, table, row, column).

    TorchRec initialises each shard on its own rank from that rank's RNG, so the same seed gives
    different weights under different plans or world sizes; this makes 1 and N processes start from the
    same model (and lets runs be compared across topologies). Row block b of table t is drawn from a
    generator seeded with (seed, t, b); a shard draws only the blocks it overlaps.
    """
    index = {t.name: i for i, t in enumerate(tables)}
    for module in model.modules():
        if not isinstance(module, (EmbeddingBagCollection, ShardedEmbeddingBagCollection)):
            continue
        for key, value in module.state_dict().items():  # TorchRec's layout: embedding_bags.<table>.weight
            table = key.split(".")[1]
            for offsets, shard in _local_blocks(value):
                _fill_block(shard, offsets, seed, index[table], tables[index[table]].embedding_dim, std)


def _local_blocks(value: Any) -> list[tuple[tuple[int, int], torch.Tensor]]:
    """(row offset, column offset) and local tensor of each shard this rank holds."""
    if isinstance(value, ShardedTensor):
        return [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]  # type: ignore[misc]
    if isinstance(value, DTensor):
        raise TypeError("DTensor table weights are not supported by init_tables")
    return [((0, 0), value)]


def _fill_block(shard: torch.Tensor, offsets: tuple[int, int], seed: int, table: int, width: int, std: float) -> None:
    row0, col0 = offsets
    rows, cols = shard.shape
    for block in range(row0 // INIT_BLOCK_ROWS, (row0 + rows - 1) // INIT_BLOCK_ROWS + 1):
        start = block * INIT_BLOCK_ROWS
        generator = torch.Generator(device=shard.device)
        generator.manual_seed(((seed * 1_000_003 + table) * 1_000_003 + block) % 2**63)
        lo, hi = max(row0, start), min(row0 + rows, start + INIT_BLOCK_ROWS)
        # The stream is drawn from the block's first row, so a shard starting mid-block sees the same values.
        values = torch.empty(hi - start, width, device=shard.device).normal_(0.0, std, generator=generator)
        shard[lo - row0 : hi - row0].copy_(values[lo - start : hi - start, col0 : col0 + cols])
