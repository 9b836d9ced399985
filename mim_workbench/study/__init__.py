"""The pretraining study: does pretraining on my images make my few labels go further?

:func:`run_study` compares pretraining variants (scratch, MAE, region-guided MAE, SimMIM,
MIRAM, the user's own weights) across label fractions and seeds, with paired bootstrap
intervals; see :mod:`.run`.
"""

from .config import StudyConfig, Variant, parse_variants
from .events import StudyFinished, StudyProgress
from .run import StudyResult, run_study

__all__ = ["StudyConfig", "StudyFinished", "StudyProgress", "StudyResult", "Variant", "parse_variants", "run_study"]
