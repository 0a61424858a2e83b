"""The executor: the ``llada2_moe`` model, block-diffusion generation and the expert-offload engine.

Entry points: ``executor.session.run_generation`` (a whole run from options, as
``tide generate`` does it), ``executor.engine.OffloadEngine`` (one plan on one model),
``executor.generate.generate`` (block diffusion with any runner) and ``executor.model``
(the model classes, registered with transformers' Auto classes on import).
"""
