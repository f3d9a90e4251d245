"""segserve's TorchServe handler and the pure image functions it is built on.

Nothing here imports ``training``: the handler ships alone inside the ``.mar``.
"""
