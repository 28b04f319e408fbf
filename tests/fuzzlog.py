"""What the fuzzing tests share: their example counts and the case log benches/reliability.py tallies."""

from __future__ import annotations

import json
import os


def examples(default: int) -> int:
    """CI default, or $PRUNEKIT_FUZZ_EXAMPLES (the reliability run) scaled by this test's share."""
    n = int(os.environ.get("PRUNEKIT_FUZZ_EXAMPLES", "0") or 0)
    return max(default, n * default // 40) if n else default


def record(area: str, outcome: str, detail: str = "") -> None:
    """Append one case's outcome to $PRUNEKIT_FUZZ_LOG (when set), named by the running test."""
    path = os.environ.get("PRUNEKIT_FUZZ_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # the bench counts cases per test
            f.write(json.dumps({"area": area, "outcome": outcome, "detail": detail[:300], "test": test}) + "\n")


def run_case(area: str, fn, *args) -> None:  # noqa: ANN001
    """``fn(*args)`` as one fuzz case: its outcome logged; an AssertionError logged as a failure and raised,
    unless $PRUNEKIT_FUZZ_KEEP_GOING (the reliability run counts every failure instead of stopping)."""
    try:
        outcome = fn(*args)
    except AssertionError as exc:
        record(area, "failure", str(exc))
        if not os.environ.get("PRUNEKIT_FUZZ_KEEP_GOING"):
            raise
        return
    record(area, outcome)
