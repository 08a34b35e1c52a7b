"""``python -m adascale_shard.advisor RUN ...``: the batch-size advisor's command."""

import sys

from . import main

sys.exit(main())
