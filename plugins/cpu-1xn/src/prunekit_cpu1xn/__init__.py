"""prunekit-cpu1xn: the ``pack-1xn`` layout and the ``cpu-1xn`` C++/OpenMP kernel for 1xN block sparsity."""

from prunekit_cpu1xn.kernel import Cpu1xN
from prunekit_cpu1xn.layout import Pack1xN, densify, pack_1xn

__all__ = ["Cpu1xN", "Pack1xN", "densify", "pack_1xn"]
