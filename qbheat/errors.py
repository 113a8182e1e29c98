"""The one exception type for errors a user can cause (defined in ``qbheat_contract.errors``).

Raise ``QBHeatError`` with one sentence that says what happened and what to do. Both CLIs print
it without a traceback and exit with status 2. Programming errors stay ordinary exceptions.
"""
from qbheat_contract.errors import QBHeatError

__all__ = ["QBHeatError"]
