"""The embedded testbed: a small, real text-to-image world that ships inside the package.

scikit-learn's handwritten digits are the data; a diffusers
StableDiffusionPipeline trained on them (`python -m rewardkit.testbed.train`)
is the teacher; a CNN classifier trained on one split is the reward
`digit_classifier`; an MLP trained on a disjoint split with another seed is
the independent evaluator (accuracy, Frechet distance on its features,
diversity). The trained weights ship in `rewardkit/testbed/weights/`
(about 3 MB), so `rewardkit run quickstart` trains only the generator.

Recipes refer to the packaged weights by the reserved name
``"rewardkit-testbed"`` (the default of every testbed plugin's `model` /
`weights` option); a folder written by `python -m rewardkit.testbed.train
--out DIR` can be given instead, or set for all plugins at once with the
environment variable REWARDKIT_TESTBED_WEIGHTS=DIR.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED = "rewardkit-testbed"
WEIGHTS_DIR = Path(__file__).parent / "weights"
ENV = "REWARDKIT_TESTBED_WEIGHTS"


def weights_dir(name: str = PACKAGED) -> Path:
    """The folder of testbed weights that `name` means: the packaged one (or $REWARDKIT_TESTBED_WEIGHTS), or a path."""
    from rewardkit.errors import UserError

    if name == PACKAGED:
        folder = Path(os.environ.get(ENV) or WEIGHTS_DIR)
    else:
        folder = Path(name).expanduser()
        if folder.name == "teacher" and (folder / "model_index.json").is_file():
            folder = folder.parent
    if not (folder / "teacher" / "model_index.json").is_file():
        raise UserError(
            f"testbed weights {name!r}: {folder} holds no trained testbed (teacher/model_index.json is missing). "
            "Train it with `python -m rewardkit.testbed.train` (a few minutes on a CPU; add --out DIR to write elsewhere)."
        )
    return folder
