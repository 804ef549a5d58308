"""`distkd export`: a distkd export as one self-contained serving file plus its input contract.

    distkd export runs/demo/student-kd/seed-0/export --out runs/demo/serve --format torchscript,pt2
    distkd export runs/demo/student-kd/seed-0/export --out runs/demo/serve --quantize int8

writes OUT/student.ts (TorchScript), OUT/student.pt2 (torch.export), OUT/student.onnx (ONNX,
where the onnx packages are installed), OUT/student-int8.* with --quantize, and
OUT/contract.json. Each file holds `ServingModel` (distkd.serve.module: plain torch, dense
transforms inside), embeds the contract, and loads with torch alone:

    m = torch.jit.load("student.ts")                    # or torch.export.load("student.pt2").module()
    logits = m({"C1": (values, offsets), ...}, dense)   # see contract.json

Every file is checked after it is written: loaded back, called at batch 1 and 64 on random
inputs of the contract's form, and compared with the distkd model (float: bit-identical;
int8: the largest logit difference is recorded in contract.json).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from torch.export import Dim

from distkd.config import ConfigError
from distkd.models.export import resolve_export
from distkd.serve.contract import CONTRACT_FILE, contract, example_inputs, file_entry
from distkd.serve.module import ServingModel, check_against, from_export

# onnx, onnxscript and onnxruntime are optional (not in requirements.txt): imported where --format onnx asks.

FORMATS = {"torchscript": ".ts", "pt2": ".pt2", "onnx": ".onnx"}
CHECK_BATCHES = (1, 64)
MAX_BATCH = 1 << 20
MAX_IDS = 1 << 28


@contextlib.contextmanager
def _size_oblivious():
    """Trace sizes without specializing 0/1: otherwise torch.export guards batch != 1 through
    its contiguity checks and the program refuses batch 1 (torch 2.13's recommended switch)."""
    try:
        import torch.fx.experimental._config as fx_config

        with fx_config.patch(backed_size_oblivious=True):
            yield
    except (ImportError, AttributeError):
        yield


def dynamic_shapes(module: ServingModel) -> dict[str, Any]:

    batch = Dim("batch", min=1, max=MAX_BATCH)
    return {"sparse": {name: ({0: Dim(f"ids_{i}", min=0, max=MAX_IDS)}, {0: batch + 1})
                       for i, name in enumerate(module.features)},
            "dense": {0: batch}}


def to_program(module: ServingModel, example) -> torch.export.ExportedProgram:
    with _size_oblivious(), torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes(module), strict=False)


def _save(fmt: str, module: ServingModel, path: Path, example, blob: str) -> None:
    tmp_dir = path.parent / f".tmp-{path.name}"  # the same file name inside: pt2 names its archive after it
    tmp_dir.mkdir(exist_ok=True)
    tmp = tmp_dir / path.name
    try:
        if fmt == "torchscript":
            torch.jit.save(torch.jit.script(module), str(tmp), _extra_files={CONTRACT_FILE: blob})
        elif fmt == "pt2":
            torch.export.save(to_program(module, example), str(tmp), extra_files={CONTRACT_FILE: blob})
        else:
            _save_onnx(module, tmp, example)
        tmp.replace(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _save_onnx(module: ServingModel, path: Path, example) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--format onnx: needs the onnx and onnxscript packages ({e}); pip install onnx onnxscript, "
                          "or use torchscript / pt2") from None
    with _size_oblivious(), torch.no_grad():
        torch.onnx.export(module, example, str(path), dynamo=True, dynamic_shapes=dynamic_shapes(module),
                          external_data=False)


def load(fmt: str, path: Path):
    """Load a serving file the way a server would (no distkd involved)."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    import onnxruntime as ort  # only where onnx is asked for

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(sparse, dense):
        flat = [t for pair in sparse.values() for t in pair] + [dense]
        return torch.from_numpy(sess.run(None, {n: t.numpy() for n, t in zip(names, flat)})[0])

    return run


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def _check(fmt: str, path: Path, module: ServingModel, model, schema) -> dict[str, Any]:
    """Load the file back and compare it with the eager module (exactly) and with the distkd model."""
    served = load(fmt, path)
    worst = 0.0
    for rows in CHECK_BATCHES:
        sparse, dense = example_inputs(schema, rows, seed=rows)
        got, want = served(sparse, dense), module(sparse, dense)
        exact = torch.equal(got, want) if fmt != "onnx" else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        if not exact or tuple(got.shape) != (rows, len(schema.tasks)):
            raise RuntimeError(f"{path}: the loaded file disagrees with the module at batch {rows} "
                               f"(max |Δ| {(got - want).abs().max().item():.3g})")
        worst = max(worst, check_against(module, model, sparse, dense))
    return {"batches": list(CHECK_BATCHES), "max_abs_logit_diff_vs_float": worst}


def write(export_dir: str | Path, out_dir: str | Path, formats: list[str], quantize: Optional[str] = None) -> dict:
    """Write the serving file of each format (and contract.json) into `out_dir`; return the contract."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format: {bad or formats} not among {list(FORMATS)}")
    out = Path(out_dir)
    module, model, meta = from_export(export_dir, quantize)  # a bad export is refused before out exists
    out.mkdir(parents=True, exist_ok=True)
    portable = from_export(export_dir, quantize, portable=True)[0] if quantize and "onnx" in formats else module
    schema = model.schema
    if quantize is None and (diff := check_against(module, model, *example_inputs(schema, 64, seed=1))) != 0.0:
        raise ConfigError(f"{export_dir}: the serving module differs from the model by {diff:.3g}; "
                          "is this a model kind distkd.serve.module does not know?")
    c = contract(schema, meta, str(Path(export_dir).resolve()))
    old = out / CONTRACT_FILE
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("model", {}).get("sha256") == meta["sha256"]:
            c["files"] = prev.get("files", {})  # other formats of the same model, written before
    blob = json.dumps({k: v for k, v in c.items() if k != "files"}, indent=1)
    example = example_inputs(schema, 8, seed=0)
    stem = (meta.get("role") or "model") + (f"-{quantize}" if quantize else "")
    for fmt in formats:
        path = out / f"{stem}{FORMATS[fmt]}"
        m = portable if fmt == "onnx" else module
        _save(fmt, m, path, example, blob)
        checks = _check(fmt, path, m, model, schema)
        c["files"][path.name] = file_entry(fmt, path, quantize, _sha256(path), path.stat().st_size, checks)
    tmp = out / f".{CONTRACT_FILE}.tmp"
    tmp.write_text(json.dumps(c, indent=1))
    tmp.replace(old)
    return c


def run(args) -> int:
    """`distkd export`."""
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    c = write(resolve_export(args.export), args.out, formats, args.quantize)
    for name, f in c["files"].items():
        print(f"{Path(args.out) / name}: {f['format']}, {f['bytes']:,} bytes, sha256 {f['sha256'][:12]}…"
              + (f", {f['quantization']} (max |Δ logit| vs float {f['checks']['max_abs_logit_diff_vs_float']:.2g} "
                 "on random inputs)" if f["quantization"] else ""))
    print(f"{Path(args.out) / CONTRACT_FILE}: the input contract ({len(c['inputs']['sparse']['features'])} sparse, "
          f"{len(c['inputs']['dense']['features'])} dense features, tasks {c['outputs']['tasks']})")
    return 0
