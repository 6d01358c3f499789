"""The error fmjax raises for a bad argument value, naming the argument, never a command-line flag.

A program that sets the argument from its own configuration (train/common.py maps
`("make_mesh", "sizes")` to `--config.mesh`) can catch it and add its flag; everyone else
reads the argument's name.
"""


class ArgumentError(ValueError):
  """A value of `argument` that `function` cannot use; the message says why and what to pass.

  Attributes:
    function: the public fmjax function that was given the value, e.g. "make_mesh".
    argument: its parameter (or config field) that holds it, e.g. "sizes".

  Args:
    message: what was wrong, with the offending value, and what to pass instead.
    function: sets the `function` attribute.
    argument: sets the `argument` attribute.
  """

  def __init__(self, message: str, *, function: str, argument: str):
    super().__init__(message)
    self.function, self.argument = function, argument
