"""Run configuration: the schema (:mod:`.schema`), loading (:mod:`.load`) and validation (:mod:`.validate`)."""

from gspo.config.load import field_docs, from_dict, load_config
from gspo.config.schema import ALGORITHMS, CLIP_DEFAULTS, Config
from gspo.config.validate import validate

__all__ = ["Config", "ALGORITHMS", "CLIP_DEFAULTS", "load_config", "from_dict", "field_docs", "validate"]
