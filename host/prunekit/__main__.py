"""``python -m prunekit`` (what ``torchrun ... -m prunekit run ...`` starts in every process)."""

import sys

from prunekit.cli import main

sys.exit(main())
