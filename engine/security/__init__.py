"""Security: identities, TLS and authorisation of every RPC (`certs`, `tls`, `roles`); client
tokens and roles (`users`); the audit log (`audit`). See each module's docstring.
"""
