"""``python -m mim_workbench.cli ...`` (and ``torchrun ... -m mim_workbench.cli pretrain ...``)."""

import sys

from . import main

sys.exit(main())
