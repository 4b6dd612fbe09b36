"""The demo's scenes, one module each, played in order by ``bastion.demo.scenario``."""
