"""``python -m aepo_jax`` is ``python -m aepo_jax.train``."""

import sys

from aepo_jax.train import main

sys.exit(main())
