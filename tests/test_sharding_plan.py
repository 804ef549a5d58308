"""The plan of a teacher group on CPU: a table too large to place whole is split column-wise."""

from __future__ import annotations

import pytest
import torch

from distkd.data.synth import make_schema
from distkd.models.ranking import ModelConfig, RankingModel
from distkd.models.sharding_plan import split_columns


@pytest.mark.unit
def test_tables_above_half_an_even_share_are_split_in_column_slices():
    schema = make_schema("criteo")  # cardinalities 12 .. 3,000,000: the largest is a third of all rows
    model = RankingModel(schema, ModelConfig(embedding_dim=128), device=torch.device("cpu"))  # tables on meta
    rows = {f"t_{f.name}": f.num_embeddings for f in schema.sparse}
    total = sum(rows.values())
    for ranks in (2, 3, 4):
        split = split_columns(model, ranks)
        assert set(split) == {t for t, n in rows.items() if n > total / (2 * ranks)}, ranks
        assert all(w % 4 == 0 and w * ranks <= 128 for w in split.values())
    assert split_columns(model, 2) == {"t_C25": 64}  # 3M of 9.0M rows; the 2M table stays whole
