"""Command-line entry points of the engine, with no Django.

`swarm-server MODEL ...` (or `python -m swarm.cli.run_server`) serves blocks and `swarm-dht ...`
(`python -m swarm.cli.run_dht`) runs a bootstrap peer. `manage.py runblockserver` and `manage.py rundht`
take the very same options: both build their parsers with `swarm.cli.options`.
"""
