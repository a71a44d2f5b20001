"""`python -m xllm_compile ...` is `xllm ...`."""

import sys

from xllm_compile.cli import main

sys.exit(main())
