"""Training: optimiser, train state, the step, data parallelism, the loop.

optim -> state -> step -> parallel -> loop (with metrics, preemption) ->
launch (MimicDet wiring, train.py's `train_and_evaluate`). See
docs/ARCHITECTURE.md.
"""
