"""Data preparation: read raw text, filter it for quality and language, remove duplicates and toxic
text, scrub personal data, and write token shards that ``parallax train --data DIR`` reads.

    parallax prep --input corpus/ --out prepared/ --workers 4
    parallax train --data prepared/

    from parallax.data.prep import PrepConfig, run_prep
    report = run_prep(PrepConfig(input="corpus/", out="prepared/", workers=4,
                                 stages={"gopher_quality": {"min_doc_words": 30}, "toxic": {"enabled": False}}))
    print(report.table())
"""

from parallax.data.prep.config import PrepConfig, load_prep_config
from parallax.data.prep.dedup import ExactDedup, MinHashDedup
from parallax.data.prep.document import Document, ReadError, Removed, Stage
from parallax.data.prep.executors import LocalExecutor, RayExecutor
from parallax.data.prep.language import LanguageFilter
from parallax.data.prep.noisy import noisy_corpus, write_noisy_corpus
from parallax.data.prep.normalize import Normalize
from parallax.data.prep.pii import PIIScrubber
from parallax.data.prep.pipeline import run_prep
from parallax.data.prep.quality import C4Quality, GopherQuality, GopherRepetition
from parallax.data.prep.readers import list_inputs, read_documents
from parallax.data.prep.report import Report, StageReport
from parallax.data.prep.stages import STAGE_NAMES, build_stage, stage_class
from parallax.data.prep.toxic import ToxicFilter

__all__ = [
    "C4Quality", "Document", "ExactDedup", "GopherQuality", "GopherRepetition", "LanguageFilter", "LocalExecutor",
    "MinHashDedup", "Normalize", "PIIScrubber", "PrepConfig", "RayExecutor", "ReadError", "Removed", "Report",
    "STAGE_NAMES", "Stage", "StageReport", "ToxicFilter", "build_stage", "list_inputs", "load_prep_config",
    "noisy_corpus", "read_documents", "run_prep", "stage_class", "write_noisy_corpus",
]
