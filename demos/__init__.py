"""The shipped demo models' training (`manage.py makedemomodel`): corpus and tokenizer, model shapes,
the training loop, the draft's distillation, and the build that ties them together.

A Django app only so that `manage.py` finds its command (the training modules import no Django); the engine
(`swarm/`) never imports this package: it reads the checkpoints through `swarm.demo_models`.
"""
