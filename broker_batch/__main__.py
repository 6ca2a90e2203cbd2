"""``python -m broker_batch`` is ``broker-batch``."""

import sys

from broker_batch.cli import main

sys.exit(main())
