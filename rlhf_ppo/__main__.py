"""``python -m rlhf_ppo`` is the ``rlhf-ppo`` command."""

from .cli import main

raise SystemExit(main())
