"""The one exception type that means "the user asked for something we cannot do".

The CLI prints such errors as a single line and exits non-zero; anything else
is a bug and keeps its traceback (under --debug).
"""


class UserError(Exception):
    """A mistake in the user's input, with a message that says what to do."""


class BudgetsUnmet(Exception):
    """Nothing the build could make meets the profile's budgets: a FAIL (exit 1), not a mistake in the input."""
