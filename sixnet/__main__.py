"""python -m sixnet: the sixnet command."""

from sixnet.cli import main

raise SystemExit(main())
