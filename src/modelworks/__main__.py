"""`python -m modelworks` (what torchrun launches) is the same as the `modelworks` command."""

from .cli import main

raise SystemExit(main())
