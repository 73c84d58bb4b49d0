from __future__ import annotations

from batch.cli import main

raise SystemExit(main())
