"""Who may do what, and the record of it: client tokens and roles (`users`), the audit log (`audit`).

A low layer: its modules import the standard library, `engine.errors`, `engine.files` and
`engine.formats` only, so any process (the writer endpoint, the CLI, a test) can use them.
"""
