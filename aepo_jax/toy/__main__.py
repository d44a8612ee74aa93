"""The toy base build subprocess: ``python -m aepo_jax.toy OUT_DIR RECIPE_JSON``.

Started by :func:`aepo_jax.toy.build.build_toy_base` with :data:`aepo_jax.toy.recipe.BUILD_ENV`; it
checks that environment and pins itself to one core before jax starts, then runs the recipe.
"""

import json
import logging
import sys
from pathlib import Path

from aepo_jax.toy.recipe import build_in_this_process, pin_build_process, recipe_from_dict

pin_build_process()
logging.basicConfig(level=logging.INFO, format="%(asctime)s toy base build: %(message)s", force=True)
build_in_this_process(Path(sys.argv[1]), recipe_from_dict(json.loads(sys.argv[2])))
