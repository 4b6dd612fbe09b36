"""The sandbox's backends, each behind :class:`~.base.Backend`."""
