"""A `torch.export` program (.pt2) loaded without running anything it carries.

`torch.export.load` is not a safe loader: inside the archive, weights and constants flagged
`use_pickle` and the sample inputs go through `torch.load(weights_only=False)` (the sample
inputs after a weights-only attempt fails), "opaque" constants through `pickle.loads`,
TorchScript objects through TorchScript's unpickler, and an AOTInductor model is a shared
library it dlopens. A teacher program is a path a job names, so before torch sees the bytes
`check_program` reads the archive with torch's own reader and refuses, naming the member,
whatever of that is not plain tensors: every payload torch would unpickle must load with
`torch.load(weights_only=True)`, and script objects, opaque objects, compiled code and the
pre-2.8 archive layout are refused outright. The graph itself (models/<name>.json) is JSON
whose nodes name registered operators; it is not code.
"""

from __future__ import annotations

import io
import json
from typing import Iterator

import torch

from distkd.config import ConfigError

WEIGHTS, CONSTANTS, SAMPLE_INPUTS = "data/weights/", "data/constants/", "data/sample_inputs/"
CODE_DIRS = ("data/aotinductor/", "data/executorch/", "data/mtia")  # compiled artifacts: code, not data
CONFIG_SUFFIXES = ("_weights_config.json", "_constants_config.json")
OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")  # loaded by an unpickler that builds objects


class ProgramError(ConfigError):
    """The archive holds something distkd will not let torch load."""


def _reader(data: bytes):
    try:
        return torch._C.PyTorchFileReader(io.BytesIO(data))  # what torch.export.load reads with
    except RuntimeError as e:
        raise ProgramError(f"not a torch zip archive ({(str(e).splitlines() or [''])[0][:120]})") from None


def _raw_payloads(reader, names: list[str]) -> Iterator[str]:
    """The payload members the configs declare as raw tensor bytes (no pickle); refuses the
    object constants the configs name."""
    for name in names:
        if not (name.startswith((WEIGHTS, CONSTANTS)) and name.endswith(CONFIG_SUFFIXES)):
            continue
        folder = WEIGHTS if name.startswith(WEIGHTS) else CONSTANTS
        try:
            config = json.loads(reader.get_record(name))["config"]
            entries = [(fqn, meta["path_name"], bool(meta["use_pickle"])) for fqn, meta in config.items()]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProgramError(f"{name}: not a payload config ({type(e).__name__}: {e})") from None
        for fqn, path, pickled in entries:
            if path.startswith(OBJECT_PREFIXES):
                raise ProgramError(f"{name}: constant {fqn!r} is a script or opaque object ({folder}{path}); "
                                   "loading it runs pickled code, and distkd loads tensors only")
            if not pickled:
                yield folder + path


def check_program(data: bytes) -> None:
    """Raise ProgramError unless loading `data` with torch.export.load unpickles tensors only."""
    reader = _reader(data)
    names = list(reader.get_all_records())
    if len(set(names)) != len(names):
        raise ProgramError("the archive lists a member twice (which copy a reader takes is not defined)")
    if "archive_format" not in names or reader.get_record("archive_format").decode(errors="replace") != "pt2":
        raise ProgramError("not a torch.export .pt2 archive (no archive_format 'pt2': an older layout, "
                           "whose loader unpickles without restriction; re-save it with torch.export.save)")
    for name in names:
        if name.startswith(CODE_DIRS) or name.endswith((".so", ".dll", ".dylib")):
            raise ProgramError(f"{name}: compiled code (AOTInductor or similar); distkd loads the exported "
                               "graph only: save the program with torch.export.save")
    raw = set(_raw_payloads(reader, names))
    for name in names:
        if not name.startswith((WEIGHTS, CONSTANTS, SAMPLE_INPUTS)) or name.endswith(CONFIG_SUFFIXES) or name in raw:
            continue
        payload = reader.get_record(name)
        if not payload:
            continue
        try:
            torch.load(io.BytesIO(payload), weights_only=True)
        except Exception as e:
            reason = " ".join(str(e).split())
            at = reason.find("GLOBAL ")  # torch's preamble is long; what the pickle asked for is the news
            raise ProgramError(f"{name}: a pickle that does not load with torch.load(weights_only=True): "
                               f"{'unsupported ' + reason[at:].split('. ')[0][:160] if at >= 0 else reason[:200]}") from None


def load_program(data: bytes) -> torch.nn.Module:
    """The program's module, after `check_program`; ProgramError for anything torch cannot load."""
    check_program(data)
    try:
        return torch.export.load(io.BytesIO(data)).module()
    except Exception as e:
        raise ProgramError(f"not a torch.export program: {(str(e).splitlines() or [''])[0][:200]}") from None
