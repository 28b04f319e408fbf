"""prunekit-datascores: per-weight importance scores computed from calibration data (Wanda, Taylor)."""

from prunekit_datascores.scores import Taylor, Wanda, taylor_scores, wanda_scores

__all__ = ["Taylor", "Wanda", "taylor_scores", "wanda_scores"]
