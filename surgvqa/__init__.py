"""surgvqa: a research workbook for spoken-question surgical video QA."""
import logging

from .config import Config, PRESETS, get_config

# bitsandbytes (imported by peft) warns at import that its optional CPU kernels package is missing; it then uses
# its own CPU code, which is what the 4-bit tests measure. Said once here instead of in every notebook.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["Config", "PRESETS", "get_config"]
__version__ = "0.1.0"
