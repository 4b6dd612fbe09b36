"""``bastion release``: offline signatures over the build's artifacts.

See :mod:`bastion.release.signing`.
"""
