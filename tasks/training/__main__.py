"""``python -m tasks.training`` (also under torchrun): the training entry, ``tasks.training.entry.main``."""

import sys

from tasks.training.entry import main

sys.exit(main())
