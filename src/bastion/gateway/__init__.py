"""The gateway process: Bastion's public edge."""
