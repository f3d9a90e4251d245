"""segserve clients: REST (:class:`client.rest.RestClient`) and gRPC
(:class:`client.grpc_client.GrpcClient`) with the same ``predict`` / ``ping`` / management API,
typed errors (:mod:`client.errors`) and retries (:mod:`client.retry`). CLI: ``python -m client``.

Submodules are imported explicitly (``from client.rest import RestClient``) so that the REST
client does not pay for importing grpc, and vice versa.
"""
