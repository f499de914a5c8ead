"""``python -m adnb`` — see ``adnb.cli``."""

from adnb.cli import main

raise SystemExit(main())
