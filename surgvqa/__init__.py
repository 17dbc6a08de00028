"""surgvqa: a research workbook for spoken-question surgical video QA."""
from .config import Config, PRESETS, get_config

__all__ = ["Config", "PRESETS", "get_config"]
__version__ = "0.1.0"
