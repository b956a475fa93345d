from __future__ import annotations

import sys

from mignet.cli.main import main

sys.exit(main())
