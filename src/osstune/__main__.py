"""``python -m osstune`` runs the command-line tool."""

from osstune.cli import main

raise SystemExit(main())
