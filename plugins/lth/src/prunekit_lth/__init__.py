"""prunekit-lth: Structural Lottery Tickets -- IMP with rewinding, then Refill / Refill+ (whole output
channels) or Regroup (dense row groups), with kernels that run the resulting patterns."""
