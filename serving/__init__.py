"""The ops side of TorchServe: build the ``.mar`` + manifest, start/stop/wait for a server.

``python -m serving.archive`` and ``python -m serving.server start|stop|status``.
"""
