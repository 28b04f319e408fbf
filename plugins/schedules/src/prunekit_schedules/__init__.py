"""prunekit schedules: when masks change and how sparse they are at each step."""

from prunekit_schedules.iterative import Iterative, round_sparsity
from prunekit_schedules.oneshot import Constant
from prunekit_schedules.ramps import Cos, Cubic, Exp, Linear, ramp_ratio

__all__ = ["Constant", "Cos", "Cubic", "Exp", "Iterative", "Linear", "ramp_ratio", "round_sparsity"]
