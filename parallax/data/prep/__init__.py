"""Data preparation: read raw text, filter it for quality and language, remove duplicates and toxic
text, scrub personal data, and write token shards that ``parallax train --data DIR`` reads.

    parallax prep --input corpus/ --out prepared/ --workers 4
    parallax train --data prepared/
"""

from parallax.data.prep.document import Document, ReadError, Removed, Stage
from parallax.data.prep.stages import STAGE_NAMES, build_stage, stage_class

__all__ = ["Document", "ReadError", "Removed", "Stage", "STAGE_NAMES", "build_stage", "stage_class"]
