"""``attnkit check``: will attention stay numerically safe? From a config alone, before spending compute.

    import attnkit
    report = attnkit.check("config.json", seq_len=8192, dtype="bf16")
    report.status            # "safe" | "marginal" | "unsafe"
    report.recommendations   # each with the number that triggered it

One file per idea: ``shape`` (what the config says), ``gaussian`` and ``estimate`` (the logit
maximum, derived there), ``dtypes`` (limits and rounding distortion, with the tolerance),
``safety`` (verdicts), ``curvature`` (the softmax's curvature bound), ``mitigations``, ``recommend``,
``regions`` (the sweep), ``measure`` (one forward beside the prediction), ``report`` (console and
figure), ``run`` (``check``).
"""

from attnkit.check.dtypes import DISTORTION_TOLERANCE, FORMATS, FloatFormat
from attnkit.check.estimate import HeadMoments, LogitEstimate, estimate, init_moments, moments_from_weights
from attnkit.check.run import CheckReport, LayerCheck, check
from attnkit.check.safety import Verdict, judge
from attnkit.check.shape import AttentionShape, read_shape

__all__ = [
    "DISTORTION_TOLERANCE", "FORMATS", "AttentionShape", "CheckReport", "FloatFormat", "HeadMoments", "LayerCheck",
    "LogitEstimate", "Verdict", "check", "estimate", "init_moments", "judge", "moments_from_weights", "read_shape",
]


# ``attnkit.check(...)`` works as well as ``attnkit.check.check(...)``: the package itself is callable.
import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> CheckReport:
        return check(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
