"""How a model's embedding tables are laid out over ranks: the sharding plan, for training and
for inference alike (a teacher sharded over the ranks of a cache group, an online teacher, eval).

On CPU (gloo) the planner is held to table-wise, column-wise and data-parallel, the types that
run without GPUs; on GPUs it chooses freely (row-wise included) unless the job names a type.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType

from distkd.config import ConfigError
from distkd.dist import Env

# What runs on gloo/CPU. Row-wise (and the grid/table-row-wise variants) need GPUs.
CPU_SHARDING = [ShardingType.TABLE_WISE.value, ShardingType.DATA_PARALLEL.value, ShardingType.COLUMN_WISE.value]
# A teacher sharded because its tables do not fit one process: no table replicated on every rank.
CPU_MODEL_PARALLEL = [ShardingType.TABLE_WISE.value, ShardingType.COLUMN_WISE.value]


@dataclass
class ShardingConfig:
    # "auto": on GPU the planner chooses freely; on CPU it is held to CPU_SHARDING.
    types: Literal["auto", "table_wise", "data_parallel", "column_wise"] = "auto"


def allowed_sharding_types(cfg: ShardingConfig, device: torch.device,
                           model_parallel: bool = False) -> Optional[list[str]]:
    """The types the planner may pick; None: any. `model_parallel`: on CPU, auto leaves out
    data-parallel (a teacher group splits its tables; the GPU planner still chooses freely)."""
    if cfg.types != "auto":
        if device.type == "cpu" and cfg.types not in ("table_wise", "data_parallel", "column_wise"):
            raise ConfigError(f"sharding.types={cfg.types} needs GPUs")
        return [cfg.types]
    if device.type != "cpu":
        return None
    return CPU_MODEL_PARALLEL if model_parallel else CPU_SHARDING


def embedding_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def table_configs(module: torch.nn.Module) -> list:
    configs = []
    for m in embedding_modules(module):
        configs += m.embedding_bag_configs() if isinstance(m, EmbeddingBagCollection) else m.embedding_configs()
    return configs


def table_names(module: torch.nn.Module) -> list[str]:
    return [c.name for c in table_configs(module)]


def split_columns(module: torch.nn.Module, ranks: int) -> dict[str, int]:
    """The tables a K-rank teacher group splits column-wise over its ranks, with the columns of a
    shard: those above half a rank's even share of all the tables. Placed whole, such a table
    alone unbalances the ranks (one that is a third of the teacher puts 0.61 of it on one rank of
    two); split in K column slices, every rank holds 1/K of it. Shard widths are multiples of 4,
    as the fused kernels' rows are."""
    configs = table_configs(module)
    size = {c.name: c.num_embeddings * c.embedding_dim for c in configs}
    limit = sum(size.values()) / (2 * ranks)
    return {c.name: max(4, c.embedding_dim // ranks // 4 * 4) for c in configs
            if size[c.name] > limit and c.embedding_dim >= 8}


def plan_for(model: torch.nn.Module, env: Env, cfg: ShardingConfig, model_parallel: bool = False) -> ShardingPlan:
    types = allowed_sharding_types(cfg, env.device, model_parallel)
    constraints = None
    if types is not None:
        constraints = {name: ParameterConstraints(sharding_types=types) for name in table_names(model)}
        if model_parallel and cfg.types == "auto" and env.world_size > 1:  # a teacher group: memory first
            for name, width in split_columns(model, env.world_size).items():
                constraints[name] = ParameterConstraints(sharding_types=[ShardingType.COLUMN_WISE.value],
                                                         min_partition=width)
    topology = Topology(world_size=env.world_size, compute_device=env.device.type,
                        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(model, pg=dist.GroupMember.WORLD)


def shard_for_inference(model: torch.nn.Module, env: Env, cfg: ShardingConfig,
                        model_parallel: bool = False) -> DistributedModelParallel:
    """Collective: `model` (its tables on meta) in DMP under this world's plan, in eval mode, no
    optimizer: a teacher whose tables are spread over the group's ranks (`model_parallel`: none
    replicated on CPU, see allowed_sharding_types)."""
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan_for(model, env, cfg, model_parallel))
    return dmp.eval()


def describe_plan(dmp: DistributedModelParallel) -> dict[str, str]:
    """Table -> sharding type (and ranks), for logs and summaries."""
    out = {}
    for module_plan in dmp.plan.plan.values():
        for table, spec in module_plan.items():  # type: ignore[union-attr]
            ranks = sorted(set(spec.ranks or []))
            out[table] = f"{spec.sharding_type}{ranks if ranks else ''}"
    return out
