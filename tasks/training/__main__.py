"""``python -m tasks.training`` (also under torchrun): the training entry, ``tasks.training.loop.main``."""

import sys

from tasks.training.loop import main

sys.exit(main())
