"""``python -m llmprune ...`` (the same as the ``llmprune`` command; used under ``accelerate launch``)."""

import sys

from .cli import main

sys.exit(main())
