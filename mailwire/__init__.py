"""The node <-> operator contract, written once: the node config file (`mailwire.config`), the directory
file (`mailwire.directory`) and the JSON of every admin HTTP endpoint (`mailwire.admin`), as pydantic
models. mailnode reads and answers with them, the operator (mailfleet) renders and parses with them, and
tests/operator/fakenode.py answers with them. Depends on the standard library and pydantic only, so both
sides can import it without importing each other (.importlinter checks it).
"""
