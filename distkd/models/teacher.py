"""The teacher contract: any PyTorch module that maps a batch to logits.

What a teacher receives (the `input` form of its spec; both stable):

    input: kjt    module(sparse: KeyedJaggedTensor, dense: Tensor)
                  sparse: keys = the schema's sparse feature names, in schema order; int64
                  values that are table rows (string ids hashed, hash_size ids reduced);
                  int32 lengths, one bag per row (the loader's Batch.sparse)
    input: dict   module(sparse: dict[str, tuple[Tensor, Tensor]], dense: Tensor)
                  {feature: (values int64 [N_f], offsets int64 [B+1])}, keys in schema
                  order: for modules that know nothing of TorchRec (nn.EmbeddingBag takes
                  these as they are, with include_last_offset=True)
    dense:        float32 [B, n_dense], the schema's transforms applied (distkd.data.rows)

What it returns: a Tensor [B, T] of logits (T = the schema's tasks, in order, any floating
dtype); or a tuple (logits, hidden), a dict, or an object with `logits` and optionally
`hidden` ([B, H], the layer feature distillation caches; H is `hidden_dim`).

How a teacher is given (`TeacherSpec`, distkd.models.teacher_spec; exactly one of):

    export:  a distkd export directory (export.json + model.pt, or its sharded form: dense.pt
             + tables/ as DCP shards; distkd.models.export); kjt
    factory: "package.module:function" plus `weights`, a state dict loaded with
             torch.load(weights_only=True) (a bare mapping, or {"state_dict": mapping}). The
             function is called as fn(schema=Schema, **kwargs) when it has a `schema`
             parameter, else fn(**kwargs), and returns the module (torchtune's `_component_`
             style). It is imported on every process that runs the teacher (each Ray worker,
             each rank): ship the package in the image, or in the Ray job's runtime_env
             (`py_modules` / `working_dir`, which Ray puts on the workers' sys.path).
    program: a `torch.export` program (.pt2: torch.export.save / torch.export.load); needs
             none of the user's Python where it runs. Export it with a dynamic batch size.
    ensemble: N of these combined into one target (EnsembleSpec, distkd.models.ensemble)

The fingerprint (the cache's `manifest["teacher"]["sha256"]`):

    export   export.json's sha256: of model.pt, or of every file of the sharded form
             (distkd.models.sharded_export); distkd.models.export.verify_export recomputes it
    program  the sha256 of the .pt2 file
    factory  sha256 of the canonical JSON of {factory, input, kwargs, weights: sha256 of the
             weights file, source: {file: sha256} of the factory's module, its .py file, or
             every .py file under its folder when it is a package}. Code it imports from
             elsewhere (torch, other packages) is not covered: `distkd cache verify
             --recompute` catches what that changes.

Every output is checked, every batch (a few reductions): floating logits of shape [B, T]
(and hidden [B, H] when asked), all finite. A failure raises TeacherError naming the
teacher and what it returned, with `.row` set for a non-finite value.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor

from distkd.config import ConfigError, to_dict
from distkd.data.schema import Schema
from distkd.models import ensemble
from distkd.models.teacher_spec import EnsembleSpec, TeacherError, TeacherSpec, as_spec
from distkd.models.program import ProgramError, check_program, load_program
from distkd.models.export import (
    check_loadable, load_export, read_meta, schema_mismatch, unpickling_refusal, verify_export
)

# -- fingerprints -----------------------------------------------------------------------

def _check_program(data: bytes, spec: TeacherSpec, load: bool = False):
    """distkd.models.program's check (and load), its refusal as a TeacherError."""

    try:
        return load_program(data) if load else check_program(data)
    except ProgramError as e:
        raise TeacherError(f"teacher {spec.program}: {e}") from None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str, what: str, spec: TeacherSpec) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TeacherError(f"teacher {spec.name}: cannot read its {what} {path}: {e.strerror or e}") from None


def source_files(factory: str) -> dict[str, str]:
    """{path: sha256} of the factory's module: its file, or every .py under its package folder.
    Parent packages are imported to find it; the module itself is not executed here."""
    module = factory.split(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        found, why = None, str(e)
    else:
        why = "not found"
    if found is None:
        raise TeacherError(f"teacher factory {factory}: module {module} is not importable here ({why}); install the "
                           "package or put it on PYTHONPATH (on Ray workers: the image or runtime_env py_modules)")
    if found.submodule_search_locations:
        roots = [Path(p) for p in found.submodule_search_locations]
        files = sorted(f for r in roots for f in r.rglob("*.py") if "__pycache__" not in f.parts)
        base = roots[0].parent
    else:
        files, base = [Path(found.origin)], Path(found.origin).parent
    return {str(f.relative_to(base)) if f.is_relative_to(base) else str(f): _sha256(f.read_bytes()) for f in files}


def _factory_sha(spec: TeacherSpec, weights_sha: str, sources: dict[str, str]) -> str:
    blob = {"factory": spec.factory, "input": spec.input, "kwargs": spec.kwargs, "weights": weights_sha,
            "source": sources}
    return _sha256(json.dumps(blob, sort_keys=True, default=str).encode())


def describe(spec: "TeacherSpec | EnsembleSpec", schema: Optional[Schema] = None) -> dict[str, Any]:
    """The manifest's teacher record: `sha256` (the fingerprint) and what it was computed
    from, `spec` (to load it again: `cache verify --recompute`) and `hidden_dim`. Checks an
    export's sha256, and its schema against `schema`."""

    if isinstance(spec, EnsembleSpec):
        return ensemble.describe(spec, schema, describe)
    spec = spec.resolved()
    rec: dict[str, Any] = {"form": spec.form, "name": spec.name, "spec": to_dict(spec), "input": spec.input}
    if spec.export:
        try:  # here, in the driver, before any worker or file is started
            meta = read_meta(spec.export)
            verify_export(spec.export, meta)
            check_loadable(spec.export, meta)
        except ConfigError as e:
            raise TeacherError(str(e)) from None
        if schema is not None and (why := schema_mismatch(meta, schema)):
            raise TeacherError(f"{spec.export}: the teacher was {why}")
        rec.update({k: meta.get(k) for k in ("sha256", "role", "model", "parameters", "bytes")})
        rec.update(export=spec.export, hidden_dim=int(meta["model"]["deep_arch"][-1]) if "deep_arch" in meta["model"] else None)
        if meta.get("window"):  # the partitions it trained on: the cache tells each shard's teacher age
            rec["window"] = meta["window"]
        return rec
    if spec.program:
        data = _read(spec.program, "program", spec)
        _check_program(data, spec)  # here, in the driver, before any worker or file is started
        rec.update(sha256=_sha256(data), bytes=len(data))
    else:
        weights = _sha256(_read(spec.weights, "weights", spec))
        sources = source_files(spec.factory)
        rec.update(sha256=_factory_sha(spec, weights, sources), weights_sha256=weights, source=sources)
    rec["hidden_dim"] = spec.hidden_dim
    return rec


# -- loading and calling ------------------------------------------------------------------

class TeacherOutput(NamedTuple):
    logits: Tensor  # [B, T]
    hidden: Optional[Tensor] = None  # [B, H], when asked for


def kjt_to_dict(kjt, keys: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """The dict form: {feature: (values int64, offsets int64 [B+1])} in `keys` order."""
    jts = kjt.to_dict()
    return {k: (jts[k].values().long(), jts[k].offsets().long()) for k in keys}


def _unpack(out: Any) -> tuple[Any, Any]:
    if isinstance(out, Tensor):
        return out, None
    if isinstance(out, dict):
        return out.get("logits"), out.get("hidden")
    if hasattr(out, "logits"):
        return out.logits, getattr(out, "hidden", None)
    if isinstance(out, (tuple, list)) and out:
        return out[0], out[1] if len(out) > 1 else None
    return out, None


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).removeprefix('torch.')} tensor of shape {list(x.shape)}"
    return f"a {type(x).__name__}"


class Teacher:
    """A loaded teacher: call it on a Batch's sparse and dense; every output is checked."""

    def __init__(self, module: Any, spec: TeacherSpec, sha256: str, schema: Schema, hidden_dim: Optional[int]):
        self.module, self.spec, self.sha256, self.schema = module, spec, sha256, schema
        self.hidden_dim = hidden_dim
        # CTR teachers score each binary task; next-item teachers the whole catalog
        self.tasks = schema.binary_names if schema.binary else None
        self.width = len(schema.binary) if schema.binary else schema.classes[0].num_classes
        self.keys = [f.name for f in schema.sparse]
        self.calls = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def __call__(self, sparse, dense: Tensor, hidden: bool = False) -> TeacherOutput:
        x = sparse if self.spec.input == "kjt" else kjt_to_dict(sparse, self.keys)
        if self.calls:
            out = self.module(x, dense)
        else:
            try:
                out = self.module(x, dense)
            except Exception as e:  # the first call: most likely the wrong input form
                line = (str(e).strip().splitlines() or [""])[0][:300]
                raise TeacherError(f"teacher {self.name}: its first batch, in the {self.spec.input} input form, "
                                   f"raised {type(e).__name__}: {line}") from e
        self.calls += 1
        return self.check(out, dense.shape[0], hidden)

    def check(self, out: Any, rows: int, hidden: bool = False) -> TeacherOutput:
        """Refuse an output that breaks the contract (shape, dtype, tasks, finiteness)."""
        logits, hid = _unpack(out)
        want = (f"floating logits of shape [{rows}, {self.width}] "
                + (f"(rows × tasks {self.tasks})" if self.tasks else "(rows × catalog items)"))
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or tuple(logits.shape) != (rows, self.width):
            got = _describe(logits) if logits is not None else f"{_describe(out)} without logits"
            raise TeacherError(f"teacher {self.name}: returned {got}; expected {want}")
        _finite(self.name, "logits", logits, self.tasks)
        if not hidden:
            return TeacherOutput(logits)
        if not isinstance(hid, Tensor) or not hid.is_floating_point() or tuple(hid.shape) != (rows, self.hidden_dim):
            raise TeacherError(f"teacher {self.name}: returned hidden {_describe(hid) if hid is not None else 'None'}; "
                               f"expected floating [{rows}, {self.hidden_dim}] (hidden_dim)")
        _finite(self.name, "hidden", hid, None)
        return TeacherOutput(logits, hid)


def _finite(name: str, what: str, t: Tensor, tasks: Optional[list[str]]) -> None:
    ok = torch.isfinite(t)
    if bool(ok.all()):
        return
    row, col = (int(v) for v in (~ok).nonzero()[0])
    value = float(t[row, col])
    col_name = f"task '{tasks[col]}'" if tasks else f"{'item' if what == 'logits' else 'unit'} {col}"
    e = TeacherError(f"teacher {name}: returned {value} in {what} at batch row {row} ({col_name})")
    e.row = row
    raise e


def _factory_module(spec: TeacherSpec, schema: Schema):
    mod_name, fn_name = spec.factory.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise TeacherError(f"teacher factory {spec.factory}: {type(e).__name__}: {e}; the package must be importable "
                           "on every worker (the image, or runtime_env py_modules / working_dir)") from None
    params = inspect.signature(fn).parameters
    kwargs = dict(spec.kwargs)
    if "schema" in params:
        kwargs["schema"] = schema
    try:
        module = fn(**kwargs)
    except Exception as e:  # bad kwargs, or the user's code: one line that names the call
        line = (str(e).strip().splitlines() or [""])[0][:300]
        raise TeacherError(f"teacher factory {spec.factory}: calling it with {sorted(kwargs)} raised "
                           f"{type(e).__name__}: {line}") from e
    if not isinstance(module, torch.nn.Module):
        raise TeacherError(f"teacher factory {spec.factory}: returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _state_dict(data: bytes, spec: TeacherSpec, device) -> dict:
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location=device)
    except Exception as e:  # unpickling refused (not weights only) or not a torch file
        raise TeacherError(f"teacher {spec.name}: weights {spec.weights} do not load with "
                           f"torch.load(weights_only=True): {unpickling_refusal(e)}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherError(f"teacher {spec.name}: weights {spec.weights} hold a {type(state).__name__}, not a state dict")
    return state


def load_teacher(spec: "str | TeacherSpec | EnsembleSpec", schema: Optional[Schema] = None, device: Any = "cpu",
                 expect_sha256: Optional[str] = None, parallel: Optional[Callable] = None) -> Teacher:
    """Load a teacher in eval mode on `device`. `schema` (the logs') is required except for an
    export, which carries its own. With `expect_sha256`, a teacher whose files here do not
    hash to that fingerprint (another copy of the package on this worker, a replaced file)
    is refused. An export (file or sharded) loads unsharded on this process, or with `parallel`
    (collective: every rank of a group) into a DistributedModelParallel (see load_export)."""

    spec = as_spec(spec).resolved()
    if isinstance(spec, EnsembleSpec):
        module, sha = ensemble.load(spec, schema, load_teacher, device, expect_sha256)
        return Teacher(module, spec, sha, schema, None)
    device = torch.device(device)
    if spec.export:
        try:
            module, meta = load_export(spec.export, verify=True, device=device, parallel=parallel)
        except ConfigError as e:  # a one-line reason, also from a cache worker
            raise TeacherError(str(e)) from None
        model = getattr(module, "module", module)  # the model inside a DistributedModelParallel
        if schema is not None and (why := schema_mismatch({**meta, "schema_fingerprint": model.schema.fingerprint(),
                                                            "features": model.schema.feature_names}, schema)):
            raise TeacherError(f"{spec.export}: the teacher was {why}")
        teacher = Teacher(module, spec, meta["sha256"], model.schema, model.hidden_dim)
    else:
        if schema is None:
            raise TeacherError(f"teacher {spec.name}: loading it needs the logs' schema")
        if spec.program:
            data = _read(spec.program, "program", spec)
            module = _check_program(data, spec, load=True)
            sha = _sha256(data)
            if device.type != "cpu":
                module = module.to(device)
        else:
            data = _read(spec.weights, "weights", spec)
            sha = _factory_sha(spec, _sha256(data), source_files(spec.factory))
            module = _factory_module(spec, schema)
            try:
                module.load_state_dict(_state_dict(data, spec, device))
            except RuntimeError as e:
                raise TeacherError(f"teacher {spec.name}: the weights do not fit the module the factory built: "
                                   f"{' '.join(str(e).split())[:300]}") from None
            module = module.to(device).eval()
        teacher = Teacher(module, spec, sha, schema, spec.hidden_dim)
    if expect_sha256 is not None and teacher.sha256 != expect_sha256:
        raise TeacherError(f"teacher {spec.name}: its fingerprint here is {teacher.sha256[:12]}…, expected "
                           f"{expect_sha256[:12]}…: its files (or its package's source) differ on this machine")
    return teacher


@dataclass
class TeacherRef:
    """What the cache driver hands each worker: the teacher, the logs' schema and the fingerprint."""

    spec: TeacherSpec
    schema: Schema
    sha256: str
