"""`make bench`: floor vs segserve (REST/gRPC, batching on/off) vs a naive FastAPI peer."""
