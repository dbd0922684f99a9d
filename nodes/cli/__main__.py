"""`python -m nodes.cli` runs the `lanmesh` command."""

from .main import main

raise SystemExit(main())
