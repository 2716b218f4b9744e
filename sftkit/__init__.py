"""sftkit: supervised fine-tuning of language models."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by peft) warns on every import, on CPUs with AVX512-BF16, that an optional
# kernel package is missing; nothing a user of a plain LoRA run can act on. Set before any import of it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
