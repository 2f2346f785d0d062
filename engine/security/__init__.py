"""Security: identities, TLS and authorisation of every RPC (see each module's docstring)."""
