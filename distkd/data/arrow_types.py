"""Which Arrow types a log column may have: the canonical ones (`Schema.arrow_schema`) and the
ones users' logs carry that decode to the same values (distkd.data.schema's docstring lists
them). `check_arrow_schema` refuses any other, naming the file, the column and what it accepts.
"""

from __future__ import annotations

import pyarrow as pa

from distkd.data.schema import LogsError, Schema


def _plain(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_str(t: pa.DataType) -> bool:
    t = _plain(t)
    return any(f(t) for f in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                              pa.types.is_large_binary, pa.types.is_string_view, pa.types.is_binary_view))


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(_plain(t))


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(_plain(t)) or pa.types.is_floating(_plain(t))


def _list_of(t: pa.DataType) -> pa.DataType | None:
    return t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else None


_LABEL = " (or any integer width, bool, float with NaN for no label, or a dictionary of these)"
_NUMBER = " (or float64, float16, an integer type, or a dictionary of these)"


def _accepts(schema: Schema, name: str, got: pa.DataType) -> tuple[bool, str]:
    """(whether column `name` may have type `got`, what else would be accepted, for the error)."""
    sparse = {f.name: f for f in schema.sparse}
    if name in sparse:
        f = sparse[name]
        inner = _list_of(got) if f.multi_valued else got
        if inner is None:
            return False, ""
        if f.hash is not None:
            return _is_str(inner), " (string ids: string, large_string, binary or a dictionary of them)"
        if _is_str(inner):
            return False, (f": string ids need `hash: {{function: fnv1a_fmix64, seed: 0}}` and hash_size on "
                           f"sparse feature '{name}' in schema.yaml")
        return _is_int(inner), " (or any integer width, or a dictionary of integers)"
    if name in (schema.id, schema.request_id):
        return pa.types.is_integer(got), " (or any integer width)"
    if name in [t.label for t in schema.classes]:
        return _is_int(got), " (class ids: any integer width, or a dictionary of integers)"
    if name in schema.label_columns:
        return _is_number(got) or pa.types.is_boolean(_plain(got)), _LABEL
    if name in schema.eval_columns:
        return _is_number(got) or pa.types.is_boolean(_plain(got)), _NUMBER
    return _is_number(got), _NUMBER


def check_arrow_schema(schema: Schema, actual: pa.Schema, source: str, columns: list[str] | None = None) -> None:
    """Raise LogsError naming `source` and the column if `actual` does not hold `columns`
    (default: the training columns) with types the contract accepts."""
    expected = schema.arrow_schema()
    for name in schema.training_columns() if columns is None else columns:
        want = expected.field(name).type
        idx = actual.get_field_index(name)
        if idx < 0:
            raise LogsError(f"{source}: missing column '{name}' (expected {want})")
        got = actual.field(idx).type
        if got == want:
            continue
        ok, also = _accepts(schema, name, got)
        if not ok:
            raise LogsError(f"{source}: column '{name}' has type {got}, expected {want}{also}")
