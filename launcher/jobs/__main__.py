"""`python -m launcher.jobs`: the same as `sft-jobs`."""

import sys

from launcher.jobs.cli import main

sys.exit(main())
