"""One module per `wanlite` subcommand.

Each module defines `register(subparsers)`, which adds its parser and sets
`func` to a callable taking the parsed args and returning an exit status.
`wanlite.cli` discovers every module here, so adding a command never edits a
shared file.
"""
