"""Optimizers of a sharded model: the fused FBGEMM optimizer of the tables and the dense optimizer.

``optimizer.sparse`` names the update FBGEMM fuses into the tables' backward (``attach_sparse_optimizer``,
before ``DistributedModelParallel`` shards the model); ``build_optimizer`` combines it with the dense
optimizer, and with the same sparse update for data-parallel (replicated) tables, which FBGEMM does not own.
The registries are keyed by ``recsys.config.CHOICES`` (checked at import: they cannot drift apart).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

with warnings.catch_warnings():
    # torch.distributed.optim (which TorchRec's apply_optimizer_in_backward imports) scripts its functional
    # optimizers at import: torch's own 66 torch.jit.script calls, 66 DeprecationWarnings per process that no
    # one running recsys can act on (they were most of a test run's warnings). Hidden for this import only:
    # a torch.jit.script or interface call anywhere else still warns.
    warnings.filterwarnings("ignore", r"`torch\.jit\.(script|interface)` is deprecated", DeprecationWarning)
    import torch.distributed.optim  # noqa: F401
import torchrec.optim as trec_optim
from torch import nn
from torchrec.distributed.embedding_types import ShardedEmbeddingModule
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from recsys.config import Config, check_device, registry

# Classes FBGEMM fuses into the embedding backward (torchrec maps each to an EmbOptimType).
SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = registry("optimizer.sparse", {
    "adagrad": trec_optim.Adagrad,
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
})
# The same updates as plain torch optimizers, for data-parallel (replicated) tables, which FBGEMM does not own.
REPLICATED_TABLE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = registry("optimizer.sparse", {
    "adagrad": torch.optim.Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
})
DENSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = registry("optimizer.dense", {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
})


def sparse_optimizer_kwargs(config: Config) -> dict[str, Any]:
    opt = config.optimizer
    kwargs: dict[str, Any] = {"lr": opt.sparse_lr}
    if opt.sparse in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = opt.sparse_eps
    return kwargs


def attach_sparse_optimizer(model: nn.Module, config: Config, device: torch.device) -> None:
    """Registers the fused optimizer on every EmbeddingBagCollection; DMP hands it to FBGEMM."""
    check_device(config, device.type)
    sparse_params = [p for module in model.modules() if isinstance(module, EmbeddingBagCollection) for p in module.parameters()]
    apply_optimizer_in_backward(
        SPARSE_OPTIMIZERS[config.optimizer.sparse], sparse_params, sparse_optimizer_kwargs(config)
    )



def build_optimizer(
    model: DistributedModelParallel,
    config: Config,
    wrap: Callable[[KeyedOptimizer, str], KeyedOptimizer] = lambda optimizer, role: optimizer,
) -> CombinedOptimizer:
    """The fused FBGEMM optimizer of the sharded tables, the sparse optimizer for data-parallel tables and
    a dense optimizer for everything else; ``wrap(optimizer, "sparse" | "dense")`` may wrap each (the
    learning-rate schedule does).

    TorchRec hands data-parallel tables to DDP as plain replicated parameters, dropping their in-backward
    optimizer; without the second group they would silently train with the dense optimizer and its
    learning rate.
    """
    opt = config.optimizer
    rest = dict(in_backward_optimizer_filter(model.named_parameters()))
    tables = {id(p) for module in model.modules() if isinstance(module, ShardedEmbeddingModule) for p in module.parameters()}
    replicated_tables = {name: p for name, p in rest.items() if id(p) in tables}
    dense_params = {name: p for name, p in rest.items() if name not in replicated_tables}
    dense = KeyedOptimizerWrapper(
        dense_params,
        # fused: one kernel for all parameters instead of a handful of elementwise ops per parameter per step.
        lambda params: DENSE_OPTIMIZERS[opt.dense](
            params, lr=opt.dense_lr, weight_decay=opt.dense_weight_decay, fused=True
        ),
    )
    optimizers = [wrap(model.fused_optimizer, "sparse"), wrap(dense, "dense")]
    if replicated_tables:
        sparse = REPLICATED_TABLE_OPTIMIZERS[opt.sparse]
        replicated = KeyedOptimizerWrapper(
            replicated_tables, lambda params: sparse(params, **sparse_optimizer_kwargs(config))
        )
        optimizers.append(wrap(replicated, "sparse"))
    return CombinedOptimizer(optimizers)
