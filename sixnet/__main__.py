"""python -m sixnet: the sixnet command."""

from sixnet.app.cli import main

raise SystemExit(main())
