"""``python -m kalm_mlx``: the ``kalm-mlx`` command."""

from .cli import main

raise SystemExit(main())
