"""``python -m layerfreeze ...`` (what torchrun runs: ``torchrun -m layerfreeze train ...``)."""

import sys

from layerfreeze.cli import main

sys.exit(main())
