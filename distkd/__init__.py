"""distkd: distill large recommendation models into compact ones.

Stages: logs (sharded Parquet) -> teacher training -> Ray logit cache -> student
distillation (DDP + TorchRec) -> evaluation report.
"""

__version__ = "0.1.0"

from distkd import compat as _compat

_compat.quiet_fbgemm_version_notice()  # before anything of distkd imports torchrec (distkd/compat.py)
