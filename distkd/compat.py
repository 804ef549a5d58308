"""The supported stacks, and everything that differs between them, in one place.

distkd runs on two pinned triples (scripts/stacks/<name>.txt installs each; docs/install.md):

    torch2.13   torch 2.13 + fbgemm-gpu(-cpu) 1.8.0 + torchrec 1.8.0   the default, CI's
    torch2.11   torch 2.11 + fbgemm-gpu(-cpu) 1.6.0 + torchrec 1.6.1   the GPU image's

What differs, as distkd uses them (found by running the trainer, cache, distillation,
checkpoint and sharded-export tests on both):

  * fbgemm-gpu 1.6.0's own torch compatibility table stops at 1.5, so each of its libraries
    warns, through the root logger, that it "has no entry for 1.6.0" (14 five-line warnings on
    every `import torchrec`, on stderr of every command and rank). 1.8.0's table has itself.
    `quiet_fbgemm_version_notice()` drops that one message; distkd/__init__.py calls it, so it
    is in place before anything of distkd imports torchrec.

Nothing else: the APIs distkd calls behave the same on both. Code elsewhere in distkd that would
need a version check asks this module instead. This module imports neither torch nor torchrec
(`import distkd` stays cheap); it reads installed versions from the package metadata.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata

logger = logging.getLogger(__name__)

# name -> (torch, fbgemm-gpu, torchrec) release lines; scripts/stacks/<name>.txt pins the exact
# versions (tests/test_compat.py checks the two agree).
STACKS: dict[str, tuple[str, str, str]] = {
    "torch2.13": ("2.13", "1.8", "1.8"),
    "torch2.11": ("2.11", "1.6", "1.6"),
}
DEFAULT = "torch2.13"
FBGEMM_DISTRIBUTIONS = ("fbgemm-gpu", "fbgemm-gpu-cpu")  # the CUDA build, the CPU one
FBGEMM_NO_ENTRY = "_fbgemm_torch_compat_table has no entry for"


def _line(version: str) -> str:
    """'2.11.0+cu130' -> '2.11'."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else version


def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, str | None]:
    """The installed triple (None: not installed), from the packages' metadata."""
    return {"torch": _version("torch"), "fbgemm_gpu": _version(*FBGEMM_DISTRIBUTIONS),
            "torchrec": _version("torchrec")}


def stack() -> str | None:
    """The name of the supported stack installed here, or None for an unsupported mix."""
    v = versions()
    if None in v.values():
        return None
    installed = (_line(v["torch"]), _line(v["fbgemm_gpu"]), _line(v["torchrec"]))
    return next((name for name, lines in STACKS.items() if lines == installed), None)


class _NoFbgemmVersionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FBGEMM_NO_ENTRY not in str(record.msg)


def quiet_fbgemm_version_notice() -> None:
    """Drop fbgemm-gpu 1.6.0's "compat table has no entry for 1.6.0" warnings (root logger);
    idempotent. Its real mismatch warning ("not guaranteed to be compatible") still shows."""
    root = logging.getLogger()
    if not any(isinstance(f, _NoFbgemmVersionNotice) for f in root.filters):
        root.addFilter(_NoFbgemmVersionNotice())
